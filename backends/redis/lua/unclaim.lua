-- idemq unclaim: take back fresh claims, for a claim_many that failed
-- after its SET NX PX GET pipeline had claimed some of its keys.
--
-- KEYS[1..n]  the records the pipeline created
-- ARGV[i]     the exact value it wrote to KEYS[i]
--
-- Deletes each key that still holds that value (nobody took it over
-- meanwhile), so the key is absent again as before the batch. Replies the
-- number of keys deleted.
local gone = 0
for i = 1, #KEYS do
  if pcall('GET', KEYS[i]) == ARGV[i] then
    call('DEL', KEYS[i])
    gone = gone + 1
  end
end
return gone
