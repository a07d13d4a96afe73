-- idemq revive: make a key claimable again for a replay, unless it is done
-- or a live lease holds it. Records: see src/record.rs.
--
-- KEYS[1]  the record
--
-- Replies {state, removed, lease ms left}:
--   {'-', 1, 0}      there was no record (nothing to remove)
--   {s, 1, 0}        a dead (x), released (r) or lapsed claimed (c) record
--                    was deleted, so the next claim is attempt 1
--   {'d', 0, 0}      done: left alone
--   {'c', 0, ms}     a live lease holds it: left alone
local key = KEYS[1]
local old = pcall('GET', key)
if not old then return {'-', 1, 0} end
if type(old) ~= 'string' then return refuse(key, old) end
local state, _, _, slack = fields(old)
if not state then return refuse(key) end
if state == 'd' then return {'d', 0, 0} end
if state == 'c' then
  local left = call('PTTL', key) - slack
  if left > 0 then return {'c', 0, left} end
end
call('DEL', key)
return {state, 1, 0}
