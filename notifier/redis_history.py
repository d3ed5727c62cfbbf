"""The Redis broker's data: key names, the publish script, and reading history back.

Each topic has a history stream (the last N notifications), expiring with the topic; what was
trimmed from it is read from the stream's own bookkeeping (XINFO). Reads come in chunks, so a
node never holds much more than the bytes it was asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from notifier.broker import UNBOUNDED, Bookkeeping, History, complete
from notifier.protocol import Notification

PREFIX = "notifier:"
SEQ_KEY = PREFIX + "seq"
EPOCH_KEY = PREFIX + "epoch"
IDEMPOTENCY_PREFIX = PREFIX + "idem:"
CHANNEL_PREFIX = PREFIX + "topic:"
MANY_CHANNEL = PREFIX + "many"  # every node's: what PUBLISH_MANY_LUA published, one message a call
HISTORY_PREFIX = PREFIX + "history:"
PROBE_PREFIX = PREFIX + "probe:"
MASTER_KEY = PREFIX + "master"  # the replication id of the master of the last session (Sentinel)
REJECTIONS_KEY = PREFIX + "rejections"  # sub -> "<before> <until>": tokens refused by an admin
PRESENCE_PREFIX = PREFIX + "presence:"  # notifier.redis_presence's keys

# KEYS: id counter, epoch, topic channel, topic history stream, [idempotency key]
# ARGV: frame tail (everything after the id), ts, idempotency ttl, topic, history size,
#       deadline in Redis's clock (unix ms), history ttl (seconds, 0: none)
# Returns {"<id> <ts> <topic>", 0}; for a repeated idempotency key {first answer, 1}; past the
# deadline {"", 2}: the caller has given up (answered 503) by then, so nothing may be published.
# Id, history and publication happen in one atomic step: ids follow publish order across every
# node, and the id a subscriber sees live is the id history holds. An id is Redis's clock in
# microseconds, or one above the last id when that is not higher (notifier.broker.next_id): ids
# keep increasing when the counter is lost. The epoch is the first id of this Redis's data (a
# recovery from before it has lost something). The history stream keeps the last N entries,
# plus one (stream id "<id>-0", trimmed by XADD MAXLEN N+1 itself: no XLEN, XRANGE or trim
# mark per publish). That one more is the last notification trimmed from the N, kept for its
# id: a recovery from exactly it (a client that missed exactly N) is whole, from before it is
# not; reads never return it (see HistoryReader). It all expires with the topic. Redis Cluster runs this one
# per topic (notifier.redis_cluster); one server and Sentinel run PUBLISH_BATCH_LUA.
PUBLISH_LUA = """
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[6]) then
  return {'', 2}
end
if #KEYS == 5 then
  local previous = redis.call('GET', KEYS[5])
  if previous then return {previous, 1} end
end
local last = redis.call('GET', KEYS[1])
local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
local id = string.format('%.0f', math.max(tonumber(last or '0') + 1, clock))
redis.call('SET', KEYS[1], id)
if not last then redis.call('SET', KEYS[2], id, 'NX') end
local frame = '{"type":"notification","id":"' .. id .. ARGV[1]
local envelope = id .. ' ' .. ARGV[2] .. ' ' .. frame
local size = tonumber(ARGV[5])
if size > 0 then
  redis.call('XADD', KEYS[4], 'MAXLEN', size + 1, id .. '-0', 'n', envelope)
  local ttl = tonumber(ARGV[7])
  if ttl > 0 then redis.call('EXPIRE', KEYS[4], ttl) end
end
redis.call('PUBLISH', KEYS[3], envelope)
local answer = id .. ' ' .. ARGV[2] .. ' ' .. ARGV[4]
if #KEYS == 5 then redis.call('SET', KEYS[5], answer, 'EX', ARGV[3]) end
return {answer, 0}
"""

# PUBLISH_LUA for many notifications at once, each with its own topic and data: the publishes
# one node started in one event-loop iteration (notifier.redis_batch), in one call. Redis's cost
# per call is mostly fixed: measured here (benchmarks/redis_cost.py), one notification a call
# costs 12-18 us, 16 a call about 6-8 us each. Each is published exactly as PUBLISH_LUA would,
# in the order given (ids increase along it; an idempotency key repeated in one call answers
# its first).
# KEYS: id counter, epoch, then per notification: channel, history stream, idempotency key (a
#       name never written when the notification has none)
# ARGV: deadline in Redis's clock (unix ms), history size, history ttl, idempotency ttl, then per
#       notification: topic, frame tail, ts, "1" if it has an idempotency key else "0"
# Returns {0, answer 1, outcome 1, answer 2, outcome 2, ...} (outcome 0: published, 1: the first
# answer of a repeated key); past the deadline {2}: nothing published.
PUBLISH_BATCH_LUA = """
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[1]) then
  return {2}
end
local size, ttl, keep = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local last = redis.call('GET', KEYS[1])
local next_id = math.max(tonumber(last or '0') + 1, tonumber(now[1]) * 1000000 + tonumber(now[2]))
local first_id = next_id
local reply = {0}
for i = 0, (#ARGV - 4) / 4 - 1 do
  local a, k = 5 + i * 4, 3 + i * 3
  local keyed = ARGV[a + 3] == '1'
  local previous = nil
  if keyed then previous = redis.call('GET', KEYS[k + 2]) end
  if previous then
    reply[#reply + 1] = previous
    reply[#reply + 1] = 1
  else
    local id = string.format('%.0f', next_id)
    next_id = next_id + 1
    local envelope = id .. ' ' .. ARGV[a + 2] .. ' {"type":"notification","id":"' .. id .. ARGV[a + 1]
    if size > 0 then
      redis.call('XADD', KEYS[k + 1], 'MAXLEN', size + 1, id .. '-0', 'n', envelope)
      if ttl > 0 then redis.call('EXPIRE', KEYS[k + 1], ttl) end
    end
    redis.call('PUBLISH', KEYS[k], envelope)
    local answer = id .. ' ' .. ARGV[a + 2] .. ' ' .. ARGV[a]
    if keyed then redis.call('SET', KEYS[k + 2], answer, 'EX', keep) end
    reply[#reply + 1] = answer
    reply[#reply + 1] = 0
  end
end
if next_id > first_id then
  redis.call('SET', KEYS[1], string.format('%.0f', next_id - 1))
  if not last then redis.call('SET', KEYS[2], string.format('%.0f', first_id), 'NX') end
end
return reply
"""

# One data to many topics in one atomic step, each published as PUBLISH_LUA would keep it
# (history, ids following the order given), but announced to the nodes in ONE message on
# MANY_CHANNEL, which every node subscribes: ``"<ts> <data length>\n<data>\n<id> <topic>\n..."``.
# A node delivers the topics it holds and skips the others; one message per call instead of
# one per topic spares every node a pub/sub message per topic (redis-py parses each: it was
# most of a 1,000-topic publish's cost). KEYS: id counter, epoch, MANY_CHANNEL, [the request's
# idempotency key], then per topic: history stream, [the topic's idempotency key]
# ARGV: data (encoded JSON), ts, idempotency ttl, history size, deadline in Redis's clock (unix
#       ms), history ttl, keys per topic (1, or 2 with idempotency keys), then the topics (valid
#       names: quoted as they are, they are their own JSON strings).
# Returns {0, flags, answer per topic} (flags: one character per topic, "1" where the answer is
# the first one of a repeated key); past the deadline {2}, nothing published; when a topic cannot
# be kept (its key is not a stream) {3, flags, error, answer per topic before it}: those before
# it are published and announced, none after. With idempotency
# keys, a topic is published at most once under the request's key: its own key holds its first
# answer, and the request's key (that of a single-topic publish, set here to the first topic's
# answer when missing) counts for the topic it names. The counter is moved past every new id
# before anything is kept and each topic's key is set as soon as it is kept: a script that fails
# part way has kept and announced a prefix, never an id twice, and remembers it.
PUBLISH_MANY_LUA = """
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[5]) then
  return {2}
end
local per = tonumber(ARGV[7])
local n = #ARGV - 7
local off, first, named = 3, nil, nil
if per == 2 then
  off = 4
  first = redis.call('GET', KEYS[4])
  if first then named = string.match(first, '^%d+ %d+ (.*)$') end
end
local answers, flags, fresh, done, failed = {}, {}, 0, n, nil
for i = 1, n do
  local previous = nil
  if per == 2 then
    previous = redis.call('GET', KEYS[off + i * 2])
    if not previous and named == ARGV[7 + i] then previous = first end
  end
  if previous then
    answers[i], flags[i] = previous, '1'
  else
    flags[i], fresh = '0', fresh + 1
  end
end
if fresh > 0 then
  local last = redis.call('GET', KEYS[1])
  local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local id = math.max(tonumber(last or '0') + 1, clock)
  redis.call('SET', KEYS[1], string.format('%.0f', id + fresh - 1))
  if not last then redis.call('SET', KEYS[2], string.format('%.0f', id), 'NX') end
  local ts, size, ttl = ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[6])
  local tail = ',"data":' .. ARGV[1] .. ',"ts":' .. ts .. '}'
  local lines = {ts .. ' ' .. #ARGV[1], ARGV[1]}
  done = 0
  for i = 1, n do
    if flags[i] == '0' then
      local topic, k = ARGV[7 + i], off + (i - 1) * per
      local sid = string.format('%.0f', id)
      id = id + 1
      if size > 0 then
        local envelope = sid .. ' ' .. ts .. ' {"type":"notification","id":"' .. sid
          .. '","topic":"' .. topic .. '"' .. tail
        local added = redis.pcall('XADD', KEYS[k + 1], 'MAXLEN', size + 1, sid .. '-0', 'n', envelope)
        if type(added) == 'table' and added.err then
          failed = added.err
          break
        end
        if ttl > 0 then redis.call('EXPIRE', KEYS[k + 1], ttl) end
      end
      lines[#lines + 1] = sid .. ' ' .. topic
      answers[i] = sid .. ' ' .. ts .. ' ' .. topic
      if per == 2 then redis.call('SET', KEYS[k + 2], answers[i], 'EX', ARGV[3]) end
    end
    done = i
  end
  if per == 2 and not first and answers[1] then
    redis.call('SET', KEYS[4], answers[1], 'EX', ARGV[3], 'NX')
  end
  if #lines > 2 then redis.call('PUBLISH', KEYS[3], table.concat(lines, '\\n')) end
end
local reply = {0, string.sub(table.concat(flags), 1, done)}
if failed then reply = {3, string.sub(table.concat(flags), 1, done), failed} end
for i = 1, done do reply[#reply + 1] = answers[i] end
return reply
"""

# Before a pub/sub session subscribes: the epoch, set to Redis's clock if missing (so that a
# recovery from before a wipe is known incomplete even before anything new is published), and
# the position every later id is this session's to deliver after: the id counter, or the epoch
# while nothing was published (never 0, which would mean "from the beginning").
# It also compares this server's replication id with the one stored at the last session. A
# promoted replica (its previous id is the stored one), or with ARGV[1] "1" (a Sentinel set) any
# new master, may lack notifications the old master acknowledged but never replicated: the epoch
# then moves to the next id, so every recovery from before it (and every gap fill) says
# incomplete, never a dishonest "recovered". A lone Redis restarted from its own files keeps its
# epoch: what it persisted is what it has.
SESSION_LUA = """
local now = redis.call('TIME')
local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], string.format('%.0f', clock))
end
local info = redis.call('INFO', 'replication')
local replid = string.match(info, 'master_replid:(%w+)')
local previous = string.match(info, 'master_replid2:(%w+)')
local known = redis.call('GET', KEYS[3])
if replid and known ~= replid and string.match(info, 'role:master') then
  if known and (ARGV[1] == '1' or previous == known) then
    local last = tonumber(redis.call('GET', KEYS[1]) or '0')
    local epoch = math.max(last + 1, clock, tonumber(redis.call('GET', KEYS[2])))
    redis.call('SET', KEYS[2], string.format('%.0f', epoch))
  end
  redis.call('SET', KEYS[3], replid)
end
return redis.call('GET', KEYS[1]) or redis.call('GET', KEYS[2])
"""


def parse_rejections(stored: dict[Any, Any], now: float) -> dict[str, tuple[int, int]]:
    """The rejections hash (sub -> "<before> <until>") as a dict, without the ones over."""
    found: dict[str, tuple[int, int]] = {}
    for sub, value in stored.items():
        before, until = (int(v) for v in value.split())
        if until > now:
            found[sub.decode() if isinstance(sub, bytes) else sub] = (before, until)
    return found


FIRST_CHUNK = 16  # entries of a history read's first chunk when its bytes are bounded


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _raise_first_error(replies: Sequence[Any]) -> None:
    """Raise the first error among pipeline replies (XINFO of a missing stream is expected)."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply


def _first_id(info: dict[Any, Any]) -> int:
    """The id of a stream's first entry, from its XINFO (0 when it is empty)."""
    return int(info["recorded-first-entry-id"].split(b"-")[0])


def _now_us(time_reply: Sequence[int]) -> int:
    seconds, micros = time_reply
    return int(seconds) * 1_000_000 + int(micros)


class KeyNames:
    """Where a topology keeps a topic's data: one server and Sentinel use these names (one id
    counter and epoch for the deployment); Redis Cluster puts each topic's keys in its own slot
    (``notifier.broker_cluster.ClusterKeys``)."""

    transactions = True  # history reads in MULTI/EXEC (a cluster cannot: TIME has no slot)

    def history(self, topic: str) -> str:
        return HISTORY_PREFIX + topic

    def read_epoch(self, pipe: Any, topic: str) -> None:
        """Queue on ``pipe`` the command whose reply is ``topic``'s epoch."""
        pipe.get(EPOCH_KEY)

    def read_time(self, pipe: Any, topic: str) -> None:
        """Queue on ``pipe`` the command whose reply is the clock of the server holding ``topic``."""
        pipe.time()


class HistoryReader:
    """Reads topics' retained history from one Redis, kept as ``size`` entries for ``ttl`` s."""

    def __init__(self, redis: Any, size: int, ttl: int, names: KeyNames | None = None) -> None:
        self.redis, self.size, self.ttl = redis, size, ttl
        self.names = names or KeyNames()

    def book(self, epoch: Any, info: Any, now: int) -> Bookkeeping:
        """Bookkeeping from the epoch and the stream's XINFO (an error when it does not exist).
        A stream holding more than N keeps the one trimmed last from the N as its first entry
        (the publish scripts trim to N + 1): that entry's id is the highest trimmed. A stream
        that lost entries otherwise (trimmed by a release that kept exactly N, or to fewer
        than N) counts as trimmed up to just before its first entry: cautious, never dishonest."""
        origin = mark = None
        if isinstance(info, dict):
            origin = _first_id(info)
            if info["length"] > self.size:
                mark = origin
            elif info["entries-added"] > info["length"]:
                mark = origin - 1
        return Bookkeeping(_int(epoch), origin, mark, now, self.ttl, self.size)

    async def read(self, topic: str, since: int | None, limit: int, max_bytes: int = UNBOUNDED) -> History:
        """The first ``limit`` after ``since`` (or the last ``limit``), within ``max_bytes``."""
        key = self.names.history(topic)
        found: list[Notification] = []
        total, more, whole = 0, False, True
        cursor: bytes | None = None
        while len(found) < limit and not more:
            want = limit - len(found)
            if max_bytes < UNBOUNDED:
                average = total // len(found) if found else 0
                want = min(want, FIRST_CHUNK if not average else (max_bytes - total) // average + 1)
            async with self.redis.pipeline(transaction=self.names.transactions) as pipe:
                if since is None:
                    pipe.xrevrange(key, b"(" + cursor if cursor else "+", "-", count=want)
                else:
                    pipe.xrange(key, b"(" + cursor if cursor else f"({since}-0", "+", count=want)
                pipe.xinfo_stream(key)
                if cursor is None:
                    self.names.read_epoch(pipe, topic)
                    self.names.read_time(pipe, topic)
                replies = await pipe.execute(raise_on_error=False)
            _raise_first_error([r for i, r in enumerate(replies) if i != 1])
            entries, info = replies[0], replies[1]
            if cursor is None:
                book = self.book(replies[2], info, _now_us(replies[3]))
                whole = book.size > 0 if since is None else complete(since, book)
                hidden = book.trimmed or 0  # the entry kept beyond the N (and anything older)
            elif since is not None and found:
                # The stream moved on while we paged: if the last entry read is gone, entries
                # after it may have been trimmed before we read them.
                whole = whole and isinstance(info, dict) and _first_id(info) <= found[-1].id
            for stream_id, fields in entries:
                n = Notification.from_envelope(topic, fields[b"n"])
                if n.id <= hidden:
                    cursor = stream_id
                    continue
                if total + n.size > max_bytes and found:
                    more = True
                    break
                total += n.size
                found.append(n)
                cursor = stream_id
            if len(entries) < want:
                break
        if since is None:
            found.reverse()
        return History(found, whole, more)

    async def gaps(
        self, positions: dict[str, int], most: int, most_bytes: int = UNBOUNDED
    ) -> dict[str, list[Notification] | None]:
        """For each topic, what was published after its position (at most ``most`` notifications
        of ``most_bytes`` of frames: more is for its subscribers to recover at their own pace),
        or None when that cannot be given whole (too much, or some of it lost)."""
        # The epoch and the clock are read per topic: with Redis Cluster each topic has its own
        # epoch, on its own server.
        async with self.redis.pipeline(transaction=False) as pipe:
            for topic, since in positions.items():
                self.names.read_epoch(pipe, topic)
                self.names.read_time(pipe, topic)
                pipe.xrange(self.names.history(topic), f"({since}-0", "+", count=most + 1)
                pipe.xinfo_stream(self.names.history(topic))
            replies = await pipe.execute(raise_on_error=False)
        _raise_first_error([r for i, r in enumerate(replies) if i % 4 != 3])
        answer: dict[str, list[Notification] | None] = {}
        for index, (topic, since) in enumerate(positions.items()):
            epoch, now, entries, info = replies[4 * index : 4 + 4 * index]
            book = self.book(epoch, info, _now_us(now))
            if len(entries) > most or not complete(since, book):
                answer[topic] = None
            else:
                missed = [Notification.from_envelope(topic, f[b"n"]) for _i, f in entries]
                answer[topic] = missed if sum(n.size for n in missed) <= most_bytes else None
        return answer
