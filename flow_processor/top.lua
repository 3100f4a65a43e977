-- Top-N sets and their time windows (see sink.py). Two modes:
--
-- ARGV[1] = 'add': the sums of one flush, inside its MULTI/EXEC. ARGV[2]: the newest capture
-- minute of the flush; ARGV[3]: JSON [[minute, set index (SETS), [increment, member, ...],
-- windows only], ...] (windows only, when present: not the all-time set, which the caller
-- sets itself); ARGV[4]: a TTL and ARGV[5]: JSON [key, ...] to EXPIRE (flow keys: TTL from
-- their first write). JSON packs the many values in one argument (in C, on both sides).
-- ARGV[1] = 'advance': one bounded step of moving the windows on (its own call, outside any
-- transaction: each step is one or a few set operations, so Redis is never held for long).
-- ARGV[2]: '1' to close the newest minute too (the processor has nothing more to read), else
-- '0'; ARGV[3]: members a minute's bucket keeps when it closes (TOP_FLOWS_KEPT: the smallest
-- are dropped first, at most ARGV[4] a step); ARGV[5] (optional, when not closing the newest):
-- a minute that stays open with those after it (one a partition that was just written is
-- still in: its next data for that minute then costs one increment, not five). Returns 1 when it did something (call again),
-- 0 when the windows are up to date.
--
-- Each top-N set <a>:top:<b> (hosts:top:bytes, apps:top:bytes, domains:top:bytes,
-- flows:top:endpoints) holds all-time totals and has three windows of capture time:
-- <a>:top:5m:<b>, <a>:top:1h:<b> (the last 5 or 60 closed minutes) and <a>:top:24h:<b> (the
-- closed minutes of the last closed minute's hour and the 23 hours before it). A minute is
-- open while data for it may still come in bulk: its increments go to its bucket
-- <a>:top:min:<minute>:<b> only (one ZINCRBY besides the all-time one). Closing it adds the
-- bucket to the three windows and to its hour's bucket <a>:top:hour:<hour>:<b>; minutes
-- before the newest one close after each flush, the newest one too when the processor is
-- idle. An increment for a closed minute goes straight into the windows (and buckets) that
-- hold that minute. Buckets leaving a window are subtracted from it; a minute's bucket is
-- deleted when it leaves the hour window, an hour's when it leaves the day window. So each
-- window is the exact sum of its minutes whatever the order in which partitions and
-- processors write them.
--
-- State, per set <a>: top:window:open:<a> and top:window:kept:<a> (sorted sets of the open
-- minutes, and of the closed minutes whose buckets are in the hour window),
-- top:window:hours:<a> (hours whose buckets are in the day window), top:window:closed:<a>
-- (the last closed minute), top:window:5m:<a> (the last minute subtracted from the 5 minute
-- window), top:window:closing:<a> and top:window:pending:<a> (the minute last closed, and the
-- windows and hour bucket its bucket has still to join: one a call, so that closing a minute
-- never holds Redis for several unions); top:window:clock: the newest minute seen.
local SETS = {{'hosts', 'bytes'}, {'apps', 'bytes'}, {'domains', 'bytes'}, {'flows', 'endpoints'}}

local function key(set, middle)
  return set[1] .. ':top:' .. middle .. ':' .. set[2]
end

local function state(set, what)
  return 'top:window:' .. what .. ':' .. set[1]
end

local function number(k)
  return tonumber(redis.call('GET', k))
end

local function subtract(window, bucket)
  redis.call('ZUNIONSTORE', window, 2, window, bucket, 'WEIGHTS', 1, -1)
  redis.call('ZREMRANGEBYSCORE', window, '-inf', 0)
end

-- a bucket leaves the widest window of its unit: it is needed no more
local function drop(window, bucket, index, unit)
  subtract(window, bucket)
  redis.call('DEL', bucket)
  redis.call('ZREM', index, unit)
end

local function add(target, bucket)
  redis.call('ZUNIONSTORE', target, 2, target, bucket)
end

local function first_at_most(zkey, limit)
  local found = redis.call('ZRANGEBYSCORE', zkey, '-inf', limit, 'LIMIT', 0, 1)
  if #found == 0 then return nil end
  return tonumber(found[1])
end

-- what ZINCRBY of each [increment, member, ...] of `items` into each of `targets` does, in two
-- commands a target and 1,000 members (ZMSCORE, then ZADD of the sums): one call into Redis a
-- member and target was most of what a flush's top-N sums cost. Scores are doubles on both
-- sides, so the sums are the same; a member listed twice gets both increments.
local function increment_all(targets, items)
  local members, by = {}, {}
  for j = 1, #items, 2 do
    local member = items[j + 1]
    if by[member] == nil then
      members[#members + 1] = member
      by[member] = items[j]
    else
      by[member] = by[member] + items[j]
    end
  end
  for at = 1, #members, 1000 do
    local chunk = {unpack(members, at, math.min(#members, at + 999))}
    for _, target in ipairs(targets) do
      local scores = redis.call('ZMSCORE', target, unpack(chunk))
      local sums = {}
      for i, member in ipairs(chunk) do
        sums[2 * i - 1] = (tonumber(scores[i]) or 0) + by[member]
        sums[2 * i] = member
      end
      redis.call('ZADD', target, unpack(sums))
    end
  end
end

-- the sums of one flush: see 'add' above; returns the sets it incremented, as keys of a table
local function add_top(newest_minute, groups, ttl, expire)
  local touched = {}
  local clock = number('top:window:clock')
  local newest = tonumber(newest_minute)
  if clock == nil or newest > clock then
    redis.call('SET', 'top:window:clock', newest)
    clock = newest
  end
  -- the oldest hour a window holds once the minutes before the clock's are closed (as the
  -- next 'advance' does): a minute before it will never be in a window, so it opens no bucket
  -- (records spread over thousands of past minutes made thousands of buckets to open and
  -- close one by one, for nothing)
  local oldest_hour = math.floor((clock - 1) / 60) - 23
  for _, group in ipairs(groups) do
    local minute, set, items = group[1], SETS[group[2]], group[3]
    local closed = number(state(set, 'closed'))
    local targets = {}
    if math.floor(minute / 60) < oldest_hour then
      -- no window will hold it: the all-time set only (below)
    elseif closed == nil or minute > closed then  -- open: its bucket only
      targets[1] = key(set, 'min:' .. minute)
      redis.call('ZADD', state(set, 'open'), minute, minute)
    else  -- closed: every window (and bucket) holding it now
      local kept = state(set, 'kept')
      if redis.call('ZSCORE', kept, minute) or minute > closed - 60 then
        targets[#targets + 1] = key(set, 'min:' .. minute)
        targets[#targets + 1] = key(set, '1h')
        redis.call('ZADD', kept, minute, minute)
        if minute > number(state(set, '5m')) then targets[#targets + 1] = key(set, '5m') end
      end
      local hour, hours = math.floor(minute / 60), state(set, 'hours')
      if redis.call('ZSCORE', hours, hour) or hour > math.floor(closed / 60) - 24 then
        targets[#targets + 1] = key(set, 'hour:' .. hour)
        targets[#targets + 1] = key(set, '24h')
        redis.call('ZADD', hours, hour, hour)
      end
    end
    if closed ~= nil and minute <= closed and number(state(set, 'closing')) == minute then
      -- the minute is being closed: the windows its bucket has not joined yet get the
      -- increment with the bucket
      local pending = {}
      for _, k in ipairs(redis.call('LRANGE', state(set, 'pending'), 0, -1)) do
        pending[k] = true
      end
      local joined = {}
      for _, target in ipairs(targets) do
        if not pending[target] then joined[#joined + 1] = target end
      end
      targets = joined
    end
    if not group[4] then
      targets[#targets + 1] = set[1] .. ':top:' .. set[2]  -- the all-time set
    end
    for _, target in ipairs(targets) do touched[target] = true end
    if #targets > 0 then increment_all(targets, items) end
  end
  for _, k in ipairs(expire) do
    redis.call('EXPIRE', k, ttl)
  end
  return touched
end

-- one step of 'advance': the first thing left to do, for the first set that has something
local function advance(close_newest, kept_members, step_members, open_from)
  local clock = number('top:window:clock')
  if clock == nil then return 0 end
  local limit = clock - 1
  if close_newest == '1' then
    limit = clock
  elseif open_from and open_from ~= '' then
    limit = math.min(limit, tonumber(open_from) - 1)
  end
  for _, set in ipairs(SETS) do
    -- a minute being closed: its bucket joins the next window (a union of two sets of up to
    -- TOP_FLOWS_KEPT members and more takes tens of milliseconds: one a call)
    local target = redis.call('LPOP', state(set, 'pending'))
    if target then
      add(target, key(set, 'min:' .. redis.call('GET', state(set, 'closing'))))
      return 1
    end
    local closed = number(state(set, 'closed'))
    if closed ~= nil then
      -- windows leave behind what is older than the last closed minute allows
      local kept, hours, gone5 = state(set, 'kept'), state(set, 'hours'), state(set, '5m')
      local done5 = number(gone5)
      if done5 < closed - 5 then
        local found = redis.call('ZRANGEBYSCORE', kept, '(' .. done5, closed - 5, 'LIMIT', 0, 1)
        if #found == 0 then
          redis.call('SET', gone5, closed - 5)
        else
          subtract(key(set, '5m'), key(set, 'min:' .. found[1]))
          redis.call('SET', gone5, found[1])
        end
        return 1
      end
      local old = first_at_most(kept, closed - 60)
      if old ~= nil then
        drop(key(set, '1h'), key(set, 'min:' .. old), kept, old)
        return 1
      end
      old = first_at_most(hours, math.floor(closed / 60) - 24)
      if old ~= nil then
        drop(key(set, '24h'), key(set, 'hour:' .. old), hours, old)
        return 1
      end
    end
    -- close the oldest open minute up to the limit; or move past minutes without data
    local minute = first_at_most(state(set, 'open'), limit)
    if minute ~= nil then
      local bucket = key(set, 'min:' .. minute)
      local excess = redis.call('ZCARD', bucket) - tonumber(kept_members)
      if excess > 0 then  -- a bounded bucket keeps each union short
        redis.call('ZREMRANGEBYRANK', bucket, 0, math.min(excess, tonumber(step_members)) - 1)
        return 1
      end
      -- closed from now on; its bucket joins the windows holding it one union a call (below)
      if closed == nil then redis.call('SET', state(set, '5m'), minute - 5) end
      redis.call('ZREM', state(set, 'open'), minute)
      redis.call('ZADD', state(set, 'kept'), minute, minute)
      redis.call('ZADD', state(set, 'hours'), math.floor(minute / 60), math.floor(minute / 60))
      redis.call('SET', state(set, 'closed'), minute)
      redis.call('SET', state(set, 'closing'), minute)
      redis.call('RPUSH', state(set, 'pending'), key(set, '5m'), key(set, '1h'), key(set, '24h'),
                 key(set, 'hour:' .. math.floor(minute / 60)))
      return 1
    end
    if closed ~= nil and closed < limit then
      redis.call('SET', state(set, 'closed'), limit)
      return 1
    end
  end
  return 0
end

local mode = ARGV[1]
if mode == 'add' then
  add_top(ARGV[2], cjson.decode(ARGV[3]), ARGV[4], cjson.decode(ARGV[5]))
  return 0
elseif mode == 'advance' then
  return advance(ARGV[2], ARGV[3], ARGV[4], ARGV[5])
end
