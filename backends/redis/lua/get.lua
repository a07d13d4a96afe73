-- idemq get: read a record without changing it. Records: see
-- src/record.rs.
--
-- KEYS[1]  the record
--
-- Replies nil when absent, else {state letter, attempts, lease ms left
-- (may be negative once lapsed), record ms left (PTTL)}.
local key = KEYS[1]
local old = pcall('GET', key)
if not old then return false end
if type(old) ~= 'string' then return refuse(key, old) end
local state, _, attempts, slack = fields(old)
if not state then return refuse(key) end
local ttl = call('PTTL', key)
return {state, attempts, ttl - slack, ttl}
