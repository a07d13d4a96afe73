-- idemq settle, one key, the usual case: what a complete or bury of one
-- lease needs when the key holds the caller's claim (or nothing). It runs
-- before record.lua: defining that file's helpers costs Redis more than
-- the rest of such a call (about 2 µs of 10 on Redis 7.0, 4 of 12 on
-- Valkey 9.1, measured with EVALSHA on a 2-core VM).
--
-- Arguments as settle.lua takes them. Answers 1 (applied) when the key
-- holds the caller's claim, 0 (lease lost) when it holds nothing; anything
-- else (another record, or what is not a record) goes on to settle.lua,
-- which reads the key again (the script is atomic, so it reads the same)
-- and decides as for any key.
if #KEYS == 1 then
  local key, mine = KEYS[1], ARGV[2]
  local old = redis.pcall('GET', key)
  if type(old) == 'string' and string.sub(old, 1, #mine) == mine then
    if tonumber(ARGV[1]) < 1 then
      redis.call('DEL', key)
    else
      redis.call('SET', key, ARGV[3], 'PX', ARGV[1])
    end
    return 1
  end
  if not old then return 0 end
end
