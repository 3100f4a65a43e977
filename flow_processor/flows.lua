-- Flow updates of one partition's flush, run inside its MULTI/EXEC (see sink.py).
-- ARGV[1]: a JSON array (one argument: the processor packs it in C, not field by field), one
-- entry per flow: [id, bytes, packets, last_seen, labels, fixed], where labels is 0 when the
-- application, server name and fingerprint did not change, else [app, app_guess, server_name,
-- fingerprint] ('' for a name not known), and fixed is present on the first write of this
-- processor's table entry for the flow: [src, dst, sport, dport, proto, first_seen].
-- The flows' series are created by the processor before the transaction; the top-N sets of
-- hosts, applications, domains and flow endpoints (with their time windows) are summed by the
-- processor per member and written by top.lua, with the TTLs.
local function labelled(fields, last_seen, labels)
  fields[#fields + 1] = 'last_seen'
  fields[#fields + 1] = last_seen
  if labels ~= 0 then
    fields[#fields + 1] = 'app'
    fields[#fields + 1] = labels[1]
    fields[#fields + 1] = 'app_guess'
    fields[#fields + 1] = labels[2]
    if labels[3] ~= '' then
      fields[#fields + 1] = 'server_name'
      fields[#fields + 1] = labels[3]
    end
    if labels[4] ~= '' then
      fields[#fields + 1] = 'fingerprint'
      fields[#fields + 1] = labels[4]
    end
  end
  return fields
end

for _, flow in ipairs(cjson.decode(ARGV[1])) do
  local id, bytes, labels, fixed = flow[1], flow[2], flow[5], flow[6]
  local meta = 'flow:' .. id .. ':meta'
  -- src stays the sender of the flow's very first frame: the fixed fields are written
  -- together, only when the hash has none yet; a new hash takes every field in one command
  if fixed and redis.call('HSETNX', meta, 'src', fixed[1]) == 1 then
    redis.call('HSET', meta, unpack(labelled({'dst', fixed[2], 'sport', fixed[3],
      'dport', fixed[4], 'proto', fixed[5], 'first_seen', fixed[6], 'bytes', bytes,
      'packets', flow[3]}, flow[4], labels)))
  else
    redis.call('HINCRBY', meta, 'bytes', bytes)
    redis.call('HINCRBY', meta, 'packets', flow[3])
    redis.call('HSET', meta, unpack(labelled({}, flow[4], labels)))
  end
  redis.call('ZINCRBY', 'flows:top:bytes', bytes, id)
end
return 0
