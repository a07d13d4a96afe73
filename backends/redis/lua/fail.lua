-- idemq fail: release the caller's claim so the key is claimable at once,
-- fenced by its token. The record keeps its expiry.
--
-- KEYS[1]  the record
-- ARGV[1]  the caller's token
-- ARGV[2]  '1' to give the attempt back (refund), '0' to keep it counted
--
-- Replies 1 applied, 0 lease lost. Never creates a record.
local rec = redis.call('HMGET', KEYS[1], 'state', 'token', 'attempts')
if rec[1] ~= 'claimed' or rec[2] ~= ARGV[1] then return 0 end
if ARGV[2] == '1' then
  local attempts = math.max((tonumber(rec[3]) or 0) - 1, 0)
  redis.call('HSET', KEYS[1], 'state', 'released', 'attempts',
    string.format('%d', attempts))
else
  redis.call('HSET', KEYS[1], 'state', 'released')
end
return 1
