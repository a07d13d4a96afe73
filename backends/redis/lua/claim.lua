-- idemq claim: take records that are absent, released, or whose lease
-- lapsed; n keys in one call, answered as n claims one after the other.
-- Records: see src/record.rs.
--
-- The store sends a claim of a fresh key as a plain SET NX PX GET, with no
-- script (see RedisDedupStore::claim); this script is for the keys where
-- that SET found a record it cannot answer for alone (claimed or released),
-- or something that is not a record.
--
-- KEYS[1..n]  the records
-- ARGV[1]     life, ms: max(lease, retain, 1), how long a record claimed
--             now lives at least
-- ARGV[2]     lease, ms
-- ARGV[3]     slack, ms: life - lease (the caller works these out, which
--             saves the script three conversions per call)
-- ARGV[3 + i] the new owner token for KEYS[i]
--
-- Replies one integer per key: 4 * attempts when claimed; 1 done; 2 dead;
-- 4 * remaining lease ms + 3 in progress. A flat array, or for one key the
-- integer alone (a table reply costs Redis more than the rest of a
-- single-key call). A key that holds no record fails the call with an
-- error, and the call leaves every key as it found it.
--
-- A key that is absent (again) costs one command: SET NX GET writes the
-- record and answers what was there instead, if anything. Numbers go to
-- redis.call as the strings the caller sent: Redis formats a Lua number
-- argument with snprintf on every call, which costs about as much as the
-- command it is for.
local keep_ms = ARGV[1]
local fresh = ':1:' .. ARGV[3]
-- out[i]: the answer for KEYS[i]; undo[i]: how to take back what was
-- written for it (true: the key was absent; {old, expiry}: a takeover,
-- with the old value and its PEXPIRETIME, false when it had no expiry, so
-- it goes back to the very millisecond).
local out, undo = {}, {}
-- {i, error} when KEYS[i] holds no record: the call fails, and changes
-- nothing (see the end).
local failed

for i = 1, #KEYS do
  local key = KEYS[i]
  local old = pcall('SET', key, 'c:' .. ARGV[i + 3] .. fresh, 'NX', 'PX', keep_ms, 'GET')
  if not old then
    out[i] = 4
    undo[i] = true
  else
    local state, owner, attempts, slack
    if type(old) == 'string' then
      state, owner, attempts, slack = fields(old)
    end
    if not state then
      failed = {i, refuse(key, type(old) ~= 'string' and old or nil)}
      break
    end
    if state == 'd' then
      out[i] = 1
    elseif state == 'x' then
      out[i] = 2
    else
      local ttl = call('PTTL', key)
      local left = 0
      if state == 'c' then left = ttl - slack end
      if left > 0 then
        out[i] = left * 4 + 3
      else
        local keep, lease = tonumber(keep_ms), tonumber(ARGV[2])
        local value = attempts + 1
        -- Never shorten a record's life: a takeover keeps the longer.
        local life = math.max(ttl, keep)
        local record = 'c:' .. ARGV[i + 3] .. ':' .. format('%d', value) .. ':'
          .. format('%d', life - lease)
        -- The old expiry, exactly, in case this call has to be undone.
        local expires = ttl >= 0 and call('PEXPIRETIME', key)
        if ttl < keep then
          call('SET', key, record, 'PX', keep_ms)
        else
          call('SET', key, record, 'KEEPTTL')
        end
        out[i] = value * 4
        undo[i] = {old, expires}
      end
    end
  end
end

if failed then
  -- What was written for the keys before goes back as it was, last first
  -- (a key may come twice).
  for j = failed[1] - 1, 1, -1 do
    local was = undo[j]
    if was == true then
      call('DEL', KEYS[j])
    elseif was then
      local old, expires = was[1], was[2]
      if expires then
        call('SET', KEYS[j], old, 'PXAT', format('%d', expires))
      else
        call('SET', KEYS[j], old)
      end
    end
  end
  return failed[2]
end
if #KEYS == 1 then return out[1] end
return out
