-- One flush's flow updates, run inside the flush's MULTI/EXEC (see sink.py).
-- ARGV[1] per-flow series retention (ms), ARGV[2] their chunk size (bytes), then 16 values per
-- flow: id, bytes, packets, last_seen, new, src, dst, sport, dport, proto, first_seen,
-- labels_changed, app, app_guess, server_name, fingerprint, endpoints label.
-- Doing this server-side saves a client round of ~10 commands per flow.
local retention, chunk = ARGV[1], ARGV[2]
for i = 3, #ARGV, 17 do
  local id, bytes, packets = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local src, dst, app, server_name = ARGV[i + 5], ARGV[i + 6], ARGV[i + 12], ARGV[i + 14]
  local meta = 'flow:' .. id .. ':meta'
  if ARGV[i + 4] == '1' then
    -- first write of this table entry: src stays the sender of the flow's very first frame
    redis.call('HSETNX', meta, 'src', src)
    redis.call('HSETNX', meta, 'dst', dst)
    redis.call('HSETNX', meta, 'sport', ARGV[i + 7])
    redis.call('HSETNX', meta, 'dport', ARGV[i + 8])
    redis.call('HSETNX', meta, 'proto', ARGV[i + 9])
    redis.call('HSETNX', meta, 'first_seen', ARGV[i + 10])
    redis.call('PERSIST', meta)  -- it may have been set to expire when the flow went idle
    for _, metric in ipairs({'bps', 'pps'}) do
      local key = 'ts:flow:' .. id .. ':' .. metric
      if redis.call('EXISTS', key) == 0 then
        redis.call('TS.CREATE', key, 'RETENTION', retention, 'CHUNK_SIZE', chunk,
                   'DUPLICATE_POLICY', 'SUM', 'LABELS', 'dimension', 'flow', 'flow_id', id,
                   'metric', metric)
      else
        redis.call('PERSIST', key)
      end
    end
  end
  redis.call('HINCRBY', meta, 'bytes', bytes)
  redis.call('HINCRBY', meta, 'packets', packets)
  redis.call('HSET', meta, 'last_seen', ARGV[i + 3])
  if ARGV[i + 11] == '1' then
    redis.call('HSET', meta, 'app', app, 'app_guess', ARGV[i + 13])
    if server_name ~= '' then redis.call('HSET', meta, 'server_name', server_name) end
    if ARGV[i + 15] ~= '' then redis.call('HSET', meta, 'fingerprint', ARGV[i + 15]) end
  end
  redis.call('ZINCRBY', 'flows:top:bytes', bytes, id)
  redis.call('ZINCRBY', 'flows:top:endpoints', bytes, ARGV[i + 16])  -- readable, for panels
  redis.call('ZINCRBY', 'apps:top:bytes', bytes, app)
  -- top talkers: each endpoint counts the flow's bytes in both directions
  redis.call('ZINCRBY', 'hosts:top:bytes', bytes, src)
  if dst ~= src then redis.call('ZINCRBY', 'hosts:top:bytes', bytes, dst) end
  if server_name ~= '' then redis.call('ZINCRBY', 'domains:top:bytes', bytes, server_name) end
end
return 0
