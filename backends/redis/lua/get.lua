-- idemq get: read a record without changing it. Records:
-- 'state:token:lease:attempts' strings, see record.lua.
--
-- KEYS[1]  the record
--
-- Replies nil when absent, else {state letter, attempts, lease ms left
-- (may be negative once lapsed), record ms left (PTTL)}. Server clock.
local key = KEYS[1]
local old = pcall('GET', key)
if not old then return false end
if type(old) ~= 'string' then return refuse(key, old) end
local state, _, deadline, attempts = match(old, RECORD)
if not state then return refuse(key) end
return {state, tonumber(attempts), tonumber(deadline) - now_ms(),
  call('PTTL', key)}
