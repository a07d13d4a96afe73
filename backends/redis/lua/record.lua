-- idemq record: what every script starts with (scripts.rs puts this file in
-- front of each of them).
--
-- A record is one string per message key:
--
--   <state>:<token>:<attempts>:<slack>
--
-- state     one letter: c claimed, r released, d done, x dead (buried)
-- token     the fencing token of the last claim, hex digits
-- attempts  how many claims were won, decimal (at most 10 digits)
-- slack     how long the record outlives its lease, ms, decimal: the lease
--           holds while the key's own TTL (PTTL) is above it. 0 in a done
--           or dead record (it holds no lease)
--
-- e.g. c:5f0e1d2c3b4a5968:1:30000. The key's TTL is the record's life, and
-- no script needs the clock: a claim is live while PTTL > slack, so a
-- fresh claim is one SET NX PX GET. Every field but the first is digits,
-- so ':' never appears inside one and the first bytes
-- 'c:<token>:<attempts>:' tell a claim held by that lease without parsing
-- the rest.
--
-- A key holding anything else (another type, such as the hashes of an
-- earlier layout, or a string of another form) is refused with a
-- WRONGTYPE error naming the key.
local call, pcall = redis.call, redis.pcall
local find, match, format = string.find, string.match, string.format
local RECORD = '^([crdx]):(%x+):(%d+):(%d+)$'

-- The fields of `old` when it is a record: state, token, attempts (a
-- number), slack (a number); nothing when it is not. (An attempts field
-- of more than 10 digits is the lease deadline of the layout before.)
local function fields(old)
  local state, token, attempts, slack = match(old, RECORD)
  if not state or #attempts > 10 then return nil end
  return state, token, tonumber(attempts), tonumber(slack)
end

-- The error for a key whose value is not a record; `err` is what a
-- redis.pcall answered, if it failed. Errors other than WRONGTYPE (out of
-- memory, ...) are passed on as they are.
local function refuse(key, err)
  if err and not find(err.err or '', 'WRONGTYPE', 1, true) then
    return err
  end
  local kind = call('TYPE', key).ok
  local hint = ''
  if kind == 'hash' then
    hint = ' (a record of the earlier hash layout? idemq-redis records'
      .. ' are strings now: upgrade onto an empty or a new key prefix)'
  elseif kind == 'string' then
    hint = ' (a record of an earlier string layout? upgrade onto an empty'
      .. ' or a new key prefix)'
  end
  return redis.error_reply('WRONGTYPE idemq-redis: key ' .. key .. ' holds a '
    .. kind .. ' that is not a dedup record' .. hint)
end
