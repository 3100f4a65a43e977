-- Sums of one flush for the top-N sets, and TTLs of new flow keys, in one call (see sink.py):
-- the processor adds up each member's bytes over the flush's flows, and one call here saves
-- a client round trip per member. ARGV: groups of 'z', key, n, then n (increment, member)
-- pairs; or 'e', ttl, n, then n keys to EXPIRE.
local i = 1
while i <= #ARGV do
  local kind = ARGV[i]
  if kind == 'z' then
    local key, n = ARGV[i + 1], tonumber(ARGV[i + 2])
    for j = i + 3, i + 2 + 2 * n, 2 do
      redis.call('ZINCRBY', key, ARGV[j], ARGV[j + 1])
    end
    i = i + 3 + 2 * n
  else
    local ttl, n = ARGV[i + 1], tonumber(ARGV[i + 2])
    for j = i + 3, i + 2 + n do
      redis.call('EXPIRE', ARGV[j], ttl)
    end
    i = i + 3 + n
  end
end
return 0
