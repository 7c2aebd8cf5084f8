#!lua flags=allow-oom
--[[ forget_tombstone: record that a person was forgotten, up to a moment.

A tombstone is a field of its project's hash: "<kind>:<escaped id>" ->
"<request ms>|<expiry ms>". Ingest drops the person's events created at or
before the request ms, and so does the flusher right before each insert,
until the expiry (worker/privacy/tombstones.py). A second request for the
same person moves the moment forward (never back: a host with a slower
clock must not shorten an erasure) and the expiry with it.

Both keys carry the tag `{<prefix>:forget}`: one Redis Cluster slot. Fields
past their expiry are dropped here; each key expires with its last field.
A project's entry in KEYS[2] changes with every request (it carries the
request's token), so readers cache a project's tombstones under it and read
them again only after a change.

KEYS[1]  the project's tombstones (HASH)
KEYS[2]  the projects that have tombstones (HASH: project id ->
         "<latest expiry ms>|<token of the last change>")

ARGV[1]  the tombstone's field, "<kind>:<escaped id>"
ARGV[2]  the request's moment, epoch ms
ARGV[3]  its expiry, epoch ms
ARGV[4]  the project id (KEYS[2]'s field)
ARGV[5]  now, epoch ms
ARGV[6]  a token new to this request (its uuid)

Returns {request ms, expiry ms} of the tombstone now stored (an earlier
request's when it was later than this one).

allow-oom: runs above maxmemory: a forget request must be honoured on a full
Redis; it adds one small field (lua_scripts/__init__.py says which scripts may).
]]

local request, expiry, now = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5])
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if stored then
  local sep = string.find(stored, '|', 1, true)
  local old_request = tonumber(string.sub(stored, 1, sep - 1))
  if old_request and old_request > request then
    request = old_request
    expiry = tonumber(string.sub(stored, sep + 1))
  end
end
redis.call('HSET', KEYS[1], ARGV[1], request .. '|' .. expiry)

-- Drop expired tombstones; the key lives as long as its latest one.
local latest = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local value = fields[i + 1]
  local until_ms = tonumber(string.sub(value, string.find(value, '|', 1, true) + 1))
  if until_ms <= now then
    redis.call('HDEL', KEYS[1], fields[i])
  elseif until_ms > latest then
    latest = until_ms
  end
end
redis.call('PEXPIREAT', KEYS[1], latest)

redis.call('HSET', KEYS[2], ARGV[4], latest .. '|' .. ARGV[6])
local newest = 0
local projects = redis.call('HGETALL', KEYS[2])
for i = 1, #projects, 2 do
  local value = projects[i + 1]
  local until_ms = tonumber(string.sub(value, 1, (string.find(value, '|', 1, true) or 0) - 1))
  if until_ms <= now then
    redis.call('HDEL', KEYS[2], projects[i])
  elseif until_ms > newest then
    newest = until_ms
  end
end
redis.call('PEXPIREAT', KEYS[2], newest)
return {request, expiry}
