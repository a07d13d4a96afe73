-- idemq settle (complete and bury): mark the callers' records done or
-- dead, each fenced by its lease; n keys in one call, answered as n calls
-- one after the other. Records: 'state:token:attempts:slack' strings, see
-- record.lua.
--
-- KEYS[1..n]  the records
-- ARGV[1]     the new state: 'd' done (complete) or 'x' dead (bury)
-- ARGV[2]     keep_for, ms: how long claims answer done / dead; below 1
--             deletes the record
-- ARGV[2 + i] the caller's lease for KEYS[i]: '<token>:<attempts>'
--
-- Replies per key 1 applied or 0 lease lost: a flat array, or for one key
-- the integer alone (a table reply costs Redis more than the rest of a
-- single-key call). Never creates a record; keeps its token and attempts.
-- A key that holds no record fails the call with an error, and the call
-- leaves every key as it found it.
--
-- SET XX KEEPTTL GET writes the new record and answers the old one, which
-- must be the caller's claim ('c:<token>:<attempts>:'). When it was
-- anything else it goes back as it was (its TTL was kept), all within the
-- script, so nothing else ever sees the write. Once every key is answered,
-- the applied ones get their new life (or are deleted).
local state, keep = ARGV[1], ARGV[2]
local drop = tonumber(keep) < 1
-- out[i]: the answer for KEYS[i]; olds[i]: the claim it replaced.
local out, olds = {}, {}
-- {i, error} when KEYS[i] holds no record: the call fails, and changes
-- nothing (see the end).
local failed

for i = 1, #KEYS do
  local key, lease = KEYS[i], ARGV[i + 2]
  local mine = 'c:' .. lease .. ':'
  local old = pcall('SET', key, state .. ':' .. lease .. ':0', 'XX', 'KEEPTTL', 'GET')
  if type(old) == 'string' and sub(old, 1, #mine) == mine then
    out[i] = 1
    olds[i] = old
  elseif not old then
    out[i] = 0
  elseif type(old) ~= 'string' then
    -- An error: the SET did not happen.
    failed = {i, refuse(key, old)}
    break
  else
    -- Not the caller's claim: put it back.
    call('SET', key, old, 'KEEPTTL')
    if not fields(old) then
      failed = {i, refuse(key)}
      break
    end
    out[i] = 0
  end
end

if failed then
  -- The claims replaced for the keys before go back, last first (a key
  -- may come twice).
  for j = failed[1] - 1, 1, -1 do
    if olds[j] then call('SET', KEYS[j], olds[j], 'KEEPTTL') end
  end
  return failed[2]
end
for i = 1, #KEYS do
  if olds[i] then
    if drop then
      call('DEL', KEYS[i])
    else
      call('PEXPIRE', KEYS[i], keep)
    end
  end
end
if #KEYS == 1 then return out[1] end
return out
