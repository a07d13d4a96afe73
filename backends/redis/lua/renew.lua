-- idemq renew: extend the caller's lease, fenced by its token. Records:
-- see src/record.rs.
--
-- KEYS[1]  the record
-- ARGV[1]  the caller's token
-- ARGV[2]  new lease, ms from now
--
-- Replies 1 applied, 0 lease lost. Never creates a record; never shortens
-- its life.
local key, token = KEYS[1], ARGV[1]
local old = pcall('GET', key)
if not old then return 0 end
if type(old) ~= 'string' then return refuse(key, old) end
local state, owner, attempts = fields(old)
if not state then return refuse(key) end
if state ~= 'c' or owner ~= token then return 0 end
local extend = math.max(tonumber(ARGV[2]), 1)
local ttl = call('PTTL', key)
local life = math.max(ttl, extend)
local record = 'c:' .. token .. ':' .. format('%d', attempts) .. ':'
  .. format('%d', life - extend)
if ttl < extend then
  call('SET', key, record, 'PX', format('%d', extend))
else
  call('SET', key, record, 'KEEPTTL')
end
return 1
