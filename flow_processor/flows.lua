-- Flow updates of one partition's flush, run inside its MULTI/EXEC (see sink.py).
-- ARGV[1] per-flow series retention (ms), ARGV[2] their chunk size (bytes), then 16 values per
-- flow: id, bytes, packets, last_seen, new, src, dst, sport, dport, proto, first_seen,
-- labels_changed, app, app_guess, server_name, fingerprint.
-- new: '0' an entry written before, '2' the first write of this table entry, '1' the same
-- and create the flow's series here (the processor creates them before the transaction).
-- The top-N sets of hosts, applications, domains and flow endpoints (with their time windows)
-- are summed by the processor per member and written by top.lua; TTLs are set there too.
local retention, chunk = ARGV[1], ARGV[2]
for i = 3, #ARGV, 16 do
  local id, bytes = ARGV[i], ARGV[i + 1]
  local meta = 'flow:' .. id .. ':meta'
  local new = ARGV[i + 4]
  if new ~= '0' then
    -- src stays the sender of the flow's very first frame: the fixed fields are written
    -- together, only when the hash has none yet
    if redis.call('HSETNX', meta, 'src', ARGV[i + 5]) == 1 then
      redis.call('HSET', meta, 'dst', ARGV[i + 6], 'sport', ARGV[i + 7], 'dport', ARGV[i + 8],
                 'proto', ARGV[i + 9], 'first_seen', ARGV[i + 10])
    end
    if new == '1' then
      for _, metric in ipairs({'bps', 'pps'}) do
        local key = 'ts:flow:' .. id .. ':' .. metric
        if redis.call('EXISTS', key) == 0 then
          redis.call('TS.CREATE', key, 'RETENTION', retention, 'CHUNK_SIZE', chunk,
                     'DUPLICATE_POLICY', 'SUM', 'LABELS', 'dimension', 'flow', 'flow_id', id,
                     'metric', metric)
        end
      end
    end
  end
  redis.call('HINCRBY', meta, 'bytes', bytes)
  redis.call('HINCRBY', meta, 'packets', ARGV[i + 2])
  if ARGV[i + 11] == '1' then
    local fields = {'last_seen', ARGV[i + 3], 'app', ARGV[i + 12], 'app_guess', ARGV[i + 13]}
    if ARGV[i + 14] ~= '' then
      fields[#fields + 1] = 'server_name'
      fields[#fields + 1] = ARGV[i + 14]
    end
    if ARGV[i + 15] ~= '' then
      fields[#fields + 1] = 'fingerprint'
      fields[#fields + 1] = ARGV[i + 15]
    end
    redis.call('HSET', meta, unpack(fields))
  else
    redis.call('HSET', meta, 'last_seen', ARGV[i + 3])
  end
  redis.call('ZINCRBY', 'flows:top:bytes', bytes, id)
end
return 0
