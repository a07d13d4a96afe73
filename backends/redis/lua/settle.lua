-- idemq settle (complete and bury): mark the callers' records done or
-- dead, each fenced by its token; n keys in one call, answered as n calls
-- one after the other.
--
-- KEYS[1..n]  the records
-- ARGV[1]     the new state: 'done' (complete) or 'dead' (bury)
-- ARGV[2]     keep_for, ms: how long claims answer done / dead; below 1
--             deletes the record
-- ARGV[2 + i] the caller's token for KEYS[i]
--
-- Replies per key 1 applied or 0 lease lost: a flat array, or for one key
-- the integer alone (a table reply costs Redis more than the rest of a
-- single-key call). Never creates a record; keeps its token and attempts.
local state, keep = ARGV[1], ARGV[2]
local drop = tonumber(keep) < 1
local out = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local rec = redis.call('HMGET', key, 'state', 'token')
  if rec[1] ~= 'claimed' or rec[2] ~= ARGV[i + 2] then
    out[i] = 0
  else
    if drop then
      redis.call('DEL', key)
    else
      redis.call('HSET', key, 'state', state)
      redis.call('PEXPIRE', key, keep)
    end
    out[i] = 1
  end
end
if #KEYS == 1 then return out[1] end
return out
