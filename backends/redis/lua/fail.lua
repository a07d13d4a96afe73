-- idemq fail: release the caller's claim so the key is claimable at once,
-- fenced by its token. The record keeps its expiry. Records: see
-- src/record.rs.
--
-- KEYS[1]  the record
-- ARGV[1]  the caller's token
-- ARGV[2]  '1' to give the attempt back (refund), '0' to keep it counted
--
-- Replies 1 applied, 0 lease lost. Never creates a record. A record this
-- lease released already (a retried fail) answers 1 and is left alone.
local key, token = KEYS[1], ARGV[1]
local old = pcall('GET', key)
if not old then return 0 end
if type(old) ~= 'string' then return refuse(key, old) end
local state, owner, attempts, slack = fields(old)
if not state then return refuse(key) end
if owner ~= token then return 0 end
if state == 'r' then return 1 end
if state ~= 'c' then return 0 end
if ARGV[2] == '1' then
  attempts = math.max(attempts - 1, 0)
end
call('SET', key, 'r:' .. owner .. ':' .. format('%d', attempts) .. ':'
  .. format('%d', slack), 'KEEPTTL')
return 1
