-- Top-N sums of one flush, and TTLs of new flow keys, in one call (see sink.py): the processor
-- adds up each member's bytes per minute of capture time, and one call here saves a client
-- round trip per member.
--
-- Each top-N set <a>:top:<b> (hosts:top:bytes, apps:top:bytes, domains:top:bytes,
-- flows:top:endpoints) holds all-time totals, and has three time windows of capture time:
-- <a>:top:5m:<b> and <a>:top:1h:<b> (the newest minute seen and the 4 or 59 before it) and
-- <a>:top:24h:<b> (the newest hour and the 23 before it). A window is the sum of per-minute
-- buckets <a>:top:min:<minute>:<b> (or per-hour <a>:top:hour:<hour>:<b>) inside it: when the
-- newest minute moves on, the buckets that leave a window are subtracted from it (and deleted
-- once they leave every window), and an increment for a minute that already left a window
-- does not enter it. So a window equals the exact sum of its minutes, whatever the order in
-- which partitions and processors write them. The newest minute (top:window:clock) and how far
-- each window has subtracted (top:window:<window>) live in Redis, shared by every processor.
--
-- ARGV[1]: the newest capture minute of this call's data; then groups of
--   'w', minute, set index (SETS), n, then n (increment, member) pairs; or
--   'e', ttl, n, then n keys to EXPIRE.
local SETS = {{'hosts', 'bytes'}, {'apps', 'bytes'}, {'domains', 'bytes'}, {'flows', 'endpoints'}}
-- name, size in its unit, unit ('min' or 'hour'), and whether it is the widest window of its
-- unit (its buckets are deleted once subtracted from it)
local WINDOWS = {{'5m', 5, 'min', false}, {'1h', 60, 'min', true}, {'24h', 24, 'hour', true}}

local function key(set, middle)
  return set[1] .. ':top:' .. middle .. ':' .. set[2]
end

local clock = tonumber(redis.call('GET', 'top:window:clock'))
local newest = tonumber(ARGV[1])
if clock == nil or newest > clock then
  clock = newest
  redis.call('SET', 'top:window:clock', clock)
end

-- move every window up to the clock; through[name] = the last unit no longer in the window
local through = {}
for _, w in ipairs(WINDOWS) do
  local name, size, unit, widest = w[1], w[2], w[3], w[4]
  local now = clock
  if unit == 'hour' then now = math.floor(clock / 60) end
  local target = now - size
  local marker = 'top:window:' .. name
  local done = tonumber(redis.call('GET', marker))
  if done == nil then
    done = target  -- a new window: nothing of it was ever added
    redis.call('SET', marker, done)
  elseif done < target then
    -- buckets exist only for units after `done` (older ones were deleted or never made),
    -- and at most `size` of them: the loop is bounded even after a long jump of the clock
    for u = done + 1, math.min(target, done + size) do
      for _, set in ipairs(SETS) do
        local bucket = key(set, unit .. ':' .. u)
        if redis.call('EXISTS', bucket) == 1 then
          local window = key(set, name)
          redis.call('ZUNIONSTORE', window, 2, window, bucket, 'WEIGHTS', 1, -1)
          redis.call('ZREMRANGEBYSCORE', window, '-inf', 0)
          if widest then redis.call('DEL', bucket) end
        end
      end
    end
    if target > done + size then  -- the whole window expired: whatever is left is stale
      for _, set in ipairs(SETS) do redis.call('DEL', key(set, name)) end
    end
    done = target
    redis.call('SET', marker, done)
  end
  through[name] = done
end

local i = 2
while i <= #ARGV do
  local kind = ARGV[i]
  if kind == 'w' then
    local minute, set, n = tonumber(ARGV[i + 1]), SETS[tonumber(ARGV[i + 2])], tonumber(ARGV[i + 3])
    local hour = math.floor(minute / 60)
    local alltime = set[1] .. ':top:' .. set[2]
    local targets = {}
    if minute > through['1h'] then
      targets[#targets + 1] = key(set, 'min:' .. minute)
      targets[#targets + 1] = key(set, '1h')
      if minute > through['5m'] then targets[#targets + 1] = key(set, '5m') end
    end
    if hour > through['24h'] then
      targets[#targets + 1] = key(set, 'hour:' .. hour)
      targets[#targets + 1] = key(set, '24h')
    end
    for j = i + 4, i + 3 + 2 * n, 2 do
      local by, member = ARGV[j], ARGV[j + 1]
      redis.call('ZINCRBY', alltime, by, member)
      for _, target in ipairs(targets) do redis.call('ZINCRBY', target, by, member) end
    end
    i = i + 4 + 2 * n
  else
    local ttl, n = ARGV[i + 1], tonumber(ARGV[i + 2])
    for j = i + 3, i + 2 + n do
      redis.call('EXPIRE', ARGV[j], ttl)
    end
    i = i + 3 + n
  end
end
return 0
