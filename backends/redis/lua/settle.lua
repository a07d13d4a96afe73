-- idemq settle (complete and bury): mark the callers' records done or
-- dead, each fenced by its lease; n keys in one call, answered as n calls
-- one after the other. Records: see src/record.rs.
--
-- KEYS[1..n]    the records
-- ARGV[1]       keep_for, ms: how long claims answer done / dead; below 1
--               deletes the record
-- ARGV[2i]      the start of the caller's claim of KEYS[i] (its state,
--               token and attempts; see src/record.rs)
-- ARGV[2i + 1]  the record to write for KEYS[i]: the same token and
--               attempts in state 'd' done (complete) or 'x' dead (bury),
--               no slack
--
-- Replies per key 1 applied or 0 lease lost: a flat array, or for one key
-- the integer alone (a table reply costs Redis more than the rest of a
-- single-key call). Never creates a record; keeps its token and attempts.
-- A key that already holds the record to write (this lease settled it, and
-- the answer was lost) answers 1 and is left as it is.
--
-- Every key is read and compared (GET, or one MGET for many) before
-- anything is written (SET PX, or DEL), so a record that is not the caller's claim is never
-- touched, and a key that holds no record fails the call with nothing
-- changed. The caller builds both strings, which saves the script two
-- concatenations per key.
local keep = ARGV[1]
local drop = tonumber(keep) < 1

local function write(key, record)
  if drop then
    call('DEL', key)
  else
    call('SET', key, record, 'PX', keep)
  end
end

-- The answer for `key`, whose claim starts with `mine` and which is to
-- hold `record`, before any write: 1 to write, 2 when it holds `record`
-- already (applied, nothing to write), 0 for lease lost; or an error when
-- it holds no record. `old` is what an MGET read there, if anything: its
-- nil (false) is an absent key or one that is not a string, which only
-- GET tells apart.
local function check(key, mine, record, old)
  if not old then old = pcall('GET', key) end
  if type(old) == 'string' then
    if find(old, mine, 1, true) == 1 then return 1 end
    if old == record then return 2 end
    if not fields(old) then return nil, refuse(key) end
    return 0
  end
  if not old then return 0 end
  return nil, refuse(key, old)
end

if #KEYS == 1 then
  local answer, err = check(KEYS[1], ARGV[2], ARGV[3])
  if not answer then return err end
  if answer == 1 then write(KEYS[1], ARGV[3]) end
  return math.min(answer, 1)
end

-- out[i]: the answer for KEYS[i]; settled[key]: the record an earlier key
-- of this call writes there (a later one then finds it, as it would one
-- call after the other: applied for the same lease, lost for another; or
-- finds nothing, lost, when the call deletes what it settles).
-- One MGET reads every key: each redis.call costs Redis (7.0 most of all)
-- more than the GET it runs.
local out, settled = {}, {}
local olds = call('MGET', unpack(KEYS))
for i = 1, #KEYS do
  local key, record = KEYS[i], ARGV[2 * i + 1]
  local answer, err = check(key, ARGV[2 * i], record, olds[i])
  if not answer then return err end
  if settled[key] then
    -- Kept, the record is there to find: applied for the same lease,
    -- lost for another. Deleted (keep_for below 1), there is none: lost.
    answer = (not drop and settled[key] == record) and 2 or 0
  elseif answer == 1 then
    settled[key] = record
  end
  out[i] = answer
end
for i = 1, #KEYS do
  if out[i] == 1 then write(KEYS[i], ARGV[2 * i + 1]) end
  out[i] = math.min(out[i], 1)
end
return out
