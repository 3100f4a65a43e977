-- Appended to top.lua: the processor's script (see sink.py). Mode 'drain': apply the oldest
-- entries of the write journal KEYS[1], up to ARGV[3] bytes of them (DRAIN_BYTES), and remove
-- them, in one call; returns how many entries are left (with the error, as {left, error}, when
-- an entry could not be applied: the call stops after it). ARGV[2]:
-- members a top-N set keeps (TOP_FLOWS_KEPT); a set the entry grew past twice that is cut
-- back to it here (a scan makes sets grow by a flush's flows, and every increment on a big
-- set costs more), the others after the flush. A flush's transaction stores its offsets and
-- pushes its flow updates (and its series samples past the first MADD_CHUNK) here as entries
-- of a bounded size (JOURNAL_FLOWS flows, JOURNAL_SAMPLES samples): the transaction stays
-- short whatever the flush holds, each entry holds Redis for a few milliseconds, and an entry
-- is applied exactly once whoever drains it (a crash between two entries leaves the rest for
-- the next call).
--
-- An entry is MessagePack (JSON in earlier versions, still read): a map {samples = [...]}
-- (apply_samples below), or an array [newest minute, top-N groups, TTL, keys to EXPIRE, old
-- flows, counters, flows, least (apply_flows; 0 when absent)]: the first four are top.lua's
-- 'add' arguments; counters are [[name, increment], ...] of the pipeline:processor hash (a
-- flush's last entry carries them, so a counter that reached a figure means the entries before
-- it landed too). flows is one flat array, FIELDS values a flow (a flat array decodes in a
-- third of the time of an array an entry): id, bytes, packets, last_seen; app, app_guess,
-- server_name, fingerprint (app 0 when none of them changed; '' for a name not known); src,
-- dst, sport, dport, proto, first_seen on the first write of the processor's table entry for
-- the flow (src 0 else); endpoints (the flow's member of flows:top:endpoints); 1 to (re)set
-- the TTL of its hash, else 0. Old flows: entries of earlier versions, an array a flow [id,
-- bytes, packets, last_seen, labels, fixed, endpoints] (labels 0 or [app, app_guess,
-- server_name, fingerprint], fixed 0 or [src, dst, sport, dport, proto, first_seen], endpoints
-- absent: their top-N groups add it) with their TTLs in the keys to EXPIRE; they are applied
-- as flows of the flat form.
-- flows:top:bytes and flows:top:endpoints take the flow's total from its hash (ZADD): a flow
-- trimmed from them (TOP_FLOWS_KEPT) comes back with all its bytes, not those since.
local FIELDS = 16

-- an entry's old flows in the flat form
local function flattened(old)
  local flat = {}
  for _, flow in ipairs(old) do
    local labels, fixed = flow[5], flow[6]
    if labels == 0 then labels = {0, 0, '', ''} end
    if not fixed or fixed == 0 then fixed = {0, 0, 0, 0, 0, 0} end
    for _, v in ipairs({flow[1], flow[2], flow[3], flow[4], labels[1], labels[2], labels[3],
                        labels[4], fixed[1], fixed[2], fixed[3], fixed[4], fixed[5], fixed[6],
                        flow[7] or 0, 0}) do
      flat[#flat + 1] = v
    end
  end
  return flat
end

-- fields, with last_seen and the labels of the flow at flows[at] when they changed
local function labelled(fields, flows, at)
  fields[#fields + 1] = 'last_seen'
  fields[#fields + 1] = flows[at + 3]
  if flows[at + 4] ~= 0 then
    fields[#fields + 1] = 'app'
    fields[#fields + 1] = flows[at + 4]
    fields[#fields + 1] = 'app_guess'
    fields[#fields + 1] = flows[at + 5]
    if flows[at + 6] ~= '' then
      fields[#fields + 1] = 'server_name'
      fields[#fields + 1] = flows[at + 6]
    end
    if flows[at + 7] ~= '' then
      fields[#fields + 1] = 'fingerprint'
      fields[#fields + 1] = flows[at + 7]
    end
  end
  return fields
end

-- the lowest score a member of zkey needs to be among its `kept` highest now; nil while the set
-- holds fewer. Scores of flows:top:bytes and flows:top:endpoints only grow (a flow's total), so
-- a flow below it is not among the kept highest, nor will be until its total passes it: it is
-- left out (or its lower score left as it is), which keeps the top `kept` exact and spares a
-- ZADD per flow under a scan of small flows
local function floor_of(zkey, kept)
  local excess = redis.call('ZCARD', zkey) - kept
  if excess < 0 then return nil end
  return tonumber(redis.call('ZRANGE', zkey, excess, excess, 'WITHSCORES')[2])
end

-- ZADD zkey the [score, member, ...] pairs of `items`, in commands of at most 1,000 pairs
local function zadd_all(zkey, items)
  for at = 1, #items, 2000 do
    redis.call('ZADD', zkey, unpack(items, at, math.min(#items, at + 1999)))
  end
end

-- the hashes of the flows written for the first time (src not 0) that do not exist: a set of
-- keys, from one EXISTS a chunk of 1,000 (a chunk where some exist is left out: those flows
-- take the HSETNX of src). A flow's first write usually makes its hash: an HSETNX a flow was a
-- call into Redis a flow.
local function absent(flows)
  local keys, fresh = {}, {}
  for at = 1, #flows, FIELDS do
    if flows[at + 8] ~= 0 then keys[#keys + 1] = 'flow:' .. flows[at] .. ':meta' end
  end
  for at = 1, #keys, 1000 do
    local last = math.min(#keys, at + 999)
    if redis.call('EXISTS', unpack(keys, at, last)) == 0 then
      for i = at, last do fresh[keys[i]] = true end
    end
  end
  return fresh
end

-- least: a flow whose hash this call makes (its total is its bytes) enters the flows:top sets
-- only with at least this many bytes (least_new_top_total in sink.py: at least `kept` flows
-- of the same flush are above it)
local function apply_flows(flows, kept, ttl, least)
  local by_bytes, by_endpoints = {}, {}
  local bytes_floor = floor_of('flows:top:bytes', kept)
  local endpoints_floor = floor_of('flows:top:endpoints', kept)
  local fresh = absent(flows)
  for at = 1, #flows, FIELDS do
    local id, bytes, endpoints = flows[at], flows[at + 1], flows[at + 14]
    local meta = 'flow:' .. id .. ':meta'
    local total = bytes
    -- src stays the sender of the flow's very first frame: the fixed fields are written
    -- together, only when the hash has none yet; a new hash takes every field in one command
    -- (a flow listed twice finds its hash made the second time: fresh no more)
    local src = flows[at + 8]
    local made = src ~= 0 and fresh[meta]
    fresh[meta] = nil
    made = made or (src ~= 0 and redis.call('HSETNX', meta, 'src', src) == 1)
    if made then
      redis.call('HSET', meta, unpack(labelled({'src', src, 'dst', flows[at + 9],
        'sport', flows[at + 10], 'dport', flows[at + 11], 'proto', flows[at + 12],
        'first_seen', flows[at + 13], 'bytes', bytes, 'packets', flows[at + 2]}, flows, at)))
    else
      total = redis.call('HINCRBY', meta, 'bytes', bytes)
      redis.call('HINCRBY', meta, 'packets', flows[at + 2])
      redis.call('HSET', meta, unpack(labelled({}, flows, at)))
    end
    if flows[at + 15] == 1 then redis.call('EXPIRE', meta, ttl) end
    if not made or total >= least then
      if not bytes_floor or total >= bytes_floor then
        by_bytes[#by_bytes + 1] = total
        by_bytes[#by_bytes + 1] = id
      end
      if endpoints ~= 0 and (not endpoints_floor or total >= endpoints_floor) then
        by_endpoints[#by_endpoints + 1] = total
        by_endpoints[#by_endpoints + 1] = endpoints
      end
    end
  end
  zadd_all('flows:top:bytes', by_bytes)
  zadd_all('flows:top:endpoints', by_endpoints)
end

-- keep the `kept` highest of a sorted set once it holds more than twice that
local function bound(zkey, kept)
  local excess = redis.call('ZCARD', zkey) - kept
  if excess > kept then redis.call('ZREMRANGEBYRANK', zkey, 0, excess - 1) end
end

-- an entry of a flush's series samples past those its transaction applied (sink.py): one
-- TS.MADD of its [key, timestamp, value, ...] (text, at most JOURNAL_SAMPLES samples); samples
-- RedisTimeSeries refuses (older than a series' retention) are counted as the processor
-- counts those of its transactions
local function apply_samples(samples)
  local refused = 0
  for _, reply in ipairs(redis.call('TS.MADD', unpack(samples))) do
    if type(reply) == 'table' and reply.err then refused = refused + 1 end
  end
  if refused > 0 then
    redis.call('HINCRBY', 'pipeline:processor', 'rejected_samples', refused)
  end
end

-- how an entry is written, from its first byte: in JSON ('[' or '{', earlier versions) or
-- MessagePack; and whether it is a map (a JSON object or a MessagePack map: an entry of samples)
local function shape(text)
  local first = text:byte(1) or 0
  return first == 91 or first == 123,
    first == 123 or (first >= 0x80 and first <= 0x8f) or first == 0xde or first == 0xdf
end

local function apply(text, kept)
  local entry
  if shape(text) then
    entry = cjson.decode(text)
  else
    entry = cmsgpack.unpack(text)
  end
  if entry.samples then return apply_samples(entry.samples) end
  if #entry[5] > 0 then apply_flows(flattened(entry[5]), kept, entry[3], 0) end
  if entry[7] then apply_flows(entry[7], kept, entry[3], entry[8] or 0) end
  bound('flows:top:bytes', kept)
  bound('flows:top:endpoints', kept)
  for zkey in pairs(add_top(entry[1], entry[2], entry[3], entry[4])) do bound(zkey, kept) end
  for _, counter in ipairs(entry[6]) do
    redis.call('HINCRBY', 'pipeline:processor', counter[1], counter[2])
  end
end

if mode == 'drain' then
  -- entries, oldest first, until they add up to ARGV[3] bytes (one at least, one only when
  -- absent); an entry of samples gets a call of its own: samples older than their series'
  -- newest take up to 100 us each, so such an entry may hold Redis for 50 ms
  local budget, used = tonumber(ARGV[3]) or 0, 0
  repeat
    local text = redis.call('LPOP', KEYS[1])
    if not text then return 0 end
    local _, samples = shape(text)
    if samples and used > 0 then  -- left for the next call
      redis.call('LPUSH', KEYS[1], text)
      break
    end
    used = used + #text
    -- an entry that cannot be applied (a key of another type in the way, a damaged entry) is
    -- removed all the same and its error returned: it must not stop every later write (like
    -- a failed command inside EXEC, what it did before the error stays)
    local ok, err = pcall(apply, text, tonumber(ARGV[2]))
    if not ok then return {redis.call('LLEN', KEYS[1]), tostring(err)} end
  until samples or used >= budget
  return redis.call('LLEN', KEYS[1])
end
return redis.error_reply('unknown mode')
