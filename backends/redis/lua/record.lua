-- idemq record: what every script starts with (scripts.rs puts this file in
-- front of each of them): the record pattern, and the helpers that read a
-- record and refuse what is not one. What a record is (layout, life,
-- slack): src/record.rs, its one description; RECORD matches what
-- record::fields there accepts.
--
-- A key holding anything else (another type, or a string of another form)
-- is refused with a WRONGTYPE error naming the key.
local call, pcall = redis.call, redis.pcall
local find, match, format = string.find, string.match, string.format
local RECORD = '^([crdx]):(%x+):(%d+):(%d+)$'

-- The fields of `old` when it is a record: state, token, attempts (a
-- number), slack (a number); nothing when it is not (attempts has at most
-- 10 digits).
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
  return redis.error_reply('WRONGTYPE idemq-redis: key ' .. key .. ' holds a '
    .. kind .. ' that is not a dedup record')
end
