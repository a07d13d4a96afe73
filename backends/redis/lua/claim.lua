-- idemq claim: take records that are absent, released, or whose lease
-- lapsed; n keys in one call, answered as n claims one after the other.
-- Records: 'state:token:lease:attempts' strings, see record.lua.
--
-- KEYS[1..n]  the records
-- ARGV[1]     lease, ms
-- ARGV[2]     retain, ms: a record lives at least max(lease, retain)
-- ARGV[2 + i] the new owner token for KEYS[i]
--
-- Replies one integer per key: 4 * attempts when claimed; 1 done; 2 dead;
-- 4 * remaining lease ms + 3 in progress. A flat array, or for one key the
-- integer alone (a table reply costs Redis more than the rest of a
-- single-key call). Times come from the server clock, read once per call.
--
-- A fresh key costs one command: SET NX GET (Redis 7.0 on; before, GET
-- then SET) writes the record and answers what was there instead, if
-- anything. Numbers go to redis.call as strings made once per call: Redis
-- formats a Lua number argument with snprintf on every call, which costs
-- about as much as the command it is for.
local lease = tonumber(ARGV[1])
local keep = math.max(lease, tonumber(ARGV[2]), 1)
local keep_ms = format('%d', keep)
local now = now_ms()
local tail = ':' .. format('%d', now + lease) .. ':'
local fresh = tail .. '1'
-- REDIS_VERSION_NUM came with 7.0, as did SET with both NX and GET.
local nx_get = redis.REDIS_VERSION_NUM ~= nil
local out = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local old
  if nx_get then
    old = pcall('SET', key, 'c:' .. ARGV[i + 2] .. fresh, 'NX', 'PX', keep_ms, 'GET')
  else
    old = pcall('GET', key)
    if not old then
      call('SET', key, 'c:' .. ARGV[i + 2] .. fresh, 'PX', keep_ms)
    end
  end
  if not old then
    out[i] = 4
  else
    if type(old) ~= 'string' then return refuse(key, old) end
    local state, _, deadline, attempts = match(old, RECORD)
    if not state then return refuse(key) end
    if state == 'd' then
      out[i] = 1
    elseif state == 'x' then
      out[i] = 2
    else
      local left = 0
      if state == 'c' then left = tonumber(deadline) - now end
      if left > 0 then
        out[i] = left * 4 + 3
      else
        local value = tonumber(attempts) + 1
        local record = 'c:' .. ARGV[i + 2] .. tail .. format('%d', value)
        -- Never shorten a record's life: a takeover keeps the longer of the two.
        if call('PTTL', key) < keep then
          call('SET', key, record, 'PX', keep_ms)
        else
          call('SET', key, record, 'KEEPTTL')
        end
        out[i] = value * 4
      end
    end
  end
end
if #KEYS == 1 then return out[1] end
return out
