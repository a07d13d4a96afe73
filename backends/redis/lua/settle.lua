-- idemq settle (complete and bury): mark the callers' records done or
-- dead, each fenced by its token; n keys in one call, answered as n calls
-- one after the other. Records: 'state:token:lease:attempts' strings, see
-- record.lua.
--
-- KEYS[1..n]  the records
-- ARGV[1]     the new state: 'd' done (complete) or 'x' dead (bury)
-- ARGV[2]     keep_for, ms: how long claims answer done / dead; below 1
--             deletes the record
-- ARGV[2 + i] the caller's token for KEYS[i]
--
-- Replies per key 1 applied or 0 lease lost: a flat array, or for one key
-- the integer alone (a table reply costs Redis more than the rest of a
-- single-key call). Never creates a record; keeps its token, lease and
-- attempts.
local state, keep = ARGV[1], ARGV[2]
local drop = tonumber(keep) < 1
local out = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local old = pcall('GET', key)
  -- Claimed by this token: the record starts with 'c:<token>:'.
  local mine = 'c:' .. ARGV[i + 2] .. ':'
  if type(old) == 'string' and sub(old, 1, #mine) == mine then
    if drop then
      call('DEL', key)
    else
      call('SET', key, state .. sub(old, 2), 'PX', keep)
    end
    out[i] = 1
  elseif not old then
    out[i] = 0
  elseif type(old) ~= 'string' then
    return refuse(key, old)
  elseif not match(old, RECORD) then
    return refuse(key)
  else
    out[i] = 0
  end
end
if #KEYS == 1 then return out[1] end
return out
