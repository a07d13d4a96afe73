-- idemq record: what every script starts with (scripts.rs puts this file in
-- front of each of them).
--
-- A record is one string per message key:
--
--   <state>:<token>:<lease>:<attempts>
--
-- state     one letter: c claimed, r released, d done, x dead (buried)
-- token     the fencing token of the last claim, hex digits
-- lease     the lease deadline, ms on the server clock, decimal
-- attempts  how many claims were won, decimal
--
-- e.g. c:5f0e1d2c3b4a5968:1795558172956:1. Every field but the first is
-- digits, so ':' never appears inside one and the first bytes
-- 'c:<token>:' tell a claim held by <token> without parsing the rest. The
-- key's own TTL is the record's life.
--
-- A key holding anything else (another type, such as the hashes of the
-- earlier layout, or a string of another form) is refused with a
-- WRONGTYPE error naming the key, and left as it is.
local call, pcall = redis.call, redis.pcall
local sub, match, format = string.sub, string.match, string.format
local RECORD = '^([crdx]):(%x+):(%d+):(%d+)$'

-- The server clock, ms. Reading TIME before writing is fine from Redis 5
-- on (scripts replicate their effects, not the script).
local function now_ms()
  local t = call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The error for a key whose value is not a record; `err` is what a
-- redis.pcall answered, if it failed. Errors other than WRONGTYPE (out of
-- memory, ...) are passed on as they are.
local function refuse(key, err)
  if err and not string.find(err.err or '', 'WRONGTYPE', 1, true) then
    return err
  end
  local kind = call('TYPE', key).ok
  local hint = ''
  if kind == 'hash' then
    hint = ' (a record of the earlier hash layout? idemq-redis records'
      .. ' are strings now: upgrade onto an empty or a new key prefix)'
  end
  return redis.error_reply('WRONGTYPE idemq-redis: key ' .. key .. ' holds a '
    .. kind .. ' that is not a dedup record' .. hint)
end
