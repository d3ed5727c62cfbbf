"""The Redis broker's data: key names, the publish script, and reading history back.

Each topic has a history stream (the last N notifications) and a trim mark (the highest id
trimmed away), both expiring with the topic. Reads come in
chunks, so a node never holds much more than the bytes it was asked for.
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
HISTORY_PREFIX = PREFIX + "history:"
TRIMMED_PREFIX = PREFIX + "trimmed:"
PROBE_PREFIX = PREFIX + "probe:"
MASTER_KEY = PREFIX + "master"  # the replication id of the master of the last session (Sentinel)
REJECTIONS_KEY = PREFIX + "rejections"  # sub -> "<before> <until>": tokens refused by an admin

# KEYS: id counter, epoch, topic channel, topic history stream, topic trim mark,
#       [idempotency key]
# ARGV: frame tail (everything after the id), ts, idempotency ttl, topic, history size,
#       deadline in Redis's clock (unix ms), history ttl (seconds, 0: none)
# Returns {"<id> <ts> <topic>", 0}; for a repeated idempotency key {first answer, 1}; past the
# deadline {"", 2}: the caller has given up (answered 503) by then, so nothing may be published.
# Id, history and publication happen in one atomic step: ids follow publish order across every
# node, and the id a subscriber sees live is the id history holds. An id is Redis's clock in
# microseconds, or one above the last id when that is not higher (notifier.broker.next_id): ids
# keep increasing when the counter is lost. The epoch is the first id of this Redis's data (a
# recovery from before it has lost something). The history stream keeps exactly the last N
# entries (stream id "<id>-0"); the trim mark is the highest id trimmed away. Both expire with
# the topic; the stream's own count of entries ever added (XINFO) tells whether it was trimmed.
PUBLISH_LUA = """
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[6]) then
  return {'', 2}
end
if #KEYS == 6 then
  local previous = redis.call('GET', KEYS[6])
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
  local ttl = tonumber(ARGV[7])
  local excess = redis.call('XLEN', KEYS[4]) + 1 - size
  if excess > 0 then
    local gone = string.match(redis.call('XRANGE', KEYS[4], '-', '+', 'COUNT', excess)[excess][1], '^(%d+)')
    if ttl > 0 then redis.call('SET', KEYS[5], gone, 'EX', ttl) else redis.call('SET', KEYS[5], gone) end
  end
  redis.call('XADD', KEYS[4], 'MAXLEN', size, id .. '-0', 'n', envelope)
  if ttl > 0 then redis.call('EXPIRE', KEYS[4], ttl) end
end
redis.call('PUBLISH', KEYS[3], envelope)
local answer = id .. ' ' .. ARGV[2] .. ' ' .. ARGV[4]
if #KEYS == 6 then redis.call('SET', KEYS[6], answer, 'EX', ARGV[3]) end
return {answer, 0}
"""

# One data to many topics, as PUBLISH_LUA does for each, in one atomic step: ids follow the
# order given. KEYS: id counter, epoch, [the request's idempotency key], then per topic:
#   channel, history stream, trim mark, [the topic's idempotency key]
# ARGV: data (encoded JSON), ts, idempotency ttl, history size, deadline in Redis's clock (unix
#       ms), history ttl, keys per topic (3, or 4 with idempotency keys), then the topics (valid
#       names: quoted as they are, they are their own JSON strings).
# Returns {0, flags, answer per topic} (flags: one character per topic, "1" where the answer is
# the first one of a repeated key); past the deadline {2}, nothing published. With idempotency
# keys, a topic is published at most once under the request's key: its own key holds its first
# answer, and the request's key (that of a single-topic publish, set here to the first topic's
# answer when missing) counts for the topic it names. The counter is moved past every new id
# before anything is published, and each topic's key is set as soon as it is published: a
# script that fails part way has published a prefix, never an id twice, and remembers it.
PUBLISH_MANY_LUA = """
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[5]) then
  return {2}
end
local per = tonumber(ARGV[7])
local n = #ARGV - 7
local off, first, named = 2, nil, nil
if per == 4 then
  off = 3
  first = redis.call('GET', KEYS[3])
  if first then named = string.match(first, '^%d+ %d+ (.*)$') end
end
local answers, flags, fresh = {}, {}, 0
for i = 1, n do
  local previous = nil
  if per == 4 then
    previous = redis.call('GET', KEYS[off + i * 4])
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
  for i = 1, n do
    if flags[i] == '0' then
      local topic, k = ARGV[7 + i], off + (i - 1) * per
      local history, mark = KEYS[k + 2], KEYS[k + 3]
      local sid = string.format('%.0f', id)
      id = id + 1
      local envelope = sid .. ' ' .. ts .. ' {"type":"notification","id":"' .. sid
        .. '","topic":"' .. topic .. '"' .. tail
      if size > 0 then
        local excess = redis.call('XLEN', history) + 1 - size
        if excess > 0 then
          local gone = redis.call('XRANGE', history, '-', '+', 'COUNT', excess)[excess][1]
          gone = string.match(gone, '^(%d+)')
          if ttl > 0 then redis.call('SET', mark, gone, 'EX', ttl) else redis.call('SET', mark, gone) end
        end
        redis.call('XADD', history, 'MAXLEN', size, sid .. '-0', 'n', envelope)
        if ttl > 0 then redis.call('EXPIRE', history, ttl) end
      end
      redis.call('PUBLISH', KEYS[k + 1], envelope)
      answers[i] = sid .. ' ' .. ts .. ' ' .. topic
      if per == 4 then redis.call('SET', KEYS[k + 4], answers[i], 'EX', ARGV[3]) end
    end
  end
  if per == 4 and not first then redis.call('SET', KEYS[3], answers[1], 'EX', ARGV[3], 'NX') end
end
local reply = {0, table.concat(flags)}
for i = 1, n do reply[i + 2] = answers[i] end
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

    def trimmed(self, topic: str) -> str:
        return TRIMMED_PREFIX + topic

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

    def book(self, epoch: Any, info: Any, trimmed: Any, now: int) -> Bookkeeping:
        """Bookkeeping from the epoch, the stream's XINFO (an error when it does not exist) and
        its trim mark. A stream that was trimmed but lost its mark (it expired on its own, say
        after NOTIFIER_HISTORY_SIZE grew) counts as trimmed up to just before its first entry."""
        origin, mark = None, _int(trimmed)
        if isinstance(info, dict):
            origin = int(info["recorded-first-entry-id"].split(b"-")[0])
            if mark is None and info["entries-added"] > info["length"]:
                mark = origin - 1
        return Bookkeeping(_int(epoch), origin, mark, now, self.ttl, self.size)

    async def read(self, topic: str, since: int | None, limit: int, max_bytes: int = UNBOUNDED) -> History:
        """The first ``limit`` after ``since`` (or the last ``limit``), within ``max_bytes``."""
        key, mark = self.names.history(topic), self.names.trimmed(topic)
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
                pipe.get(mark)
                if cursor is None:
                    self.names.read_epoch(pipe, topic)
                    self.names.read_time(pipe, topic)
                    pipe.xinfo_stream(key)
                replies = await pipe.execute(raise_on_error=False)
            _raise_first_error(replies[:-1] if cursor is None else replies)
            entries = replies[0]
            if cursor is None:
                book = self.book(replies[2], replies[4], replies[1], _now_us(replies[3]))
                whole = book.size > 0 if since is None else complete(since, book)
            elif since is not None and found:
                trimmed = _int(replies[1])
                whole = whole and (trimmed is None or trimmed <= found[-1].id)
            for stream_id, fields in entries:
                n = Notification.from_envelope(topic, fields[b"n"])
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
                pipe.get(self.names.trimmed(topic))
                pipe.xinfo_stream(self.names.history(topic))
            replies = await pipe.execute(raise_on_error=False)
        _raise_first_error([r for i, r in enumerate(replies) if i % 5 != 4])
        answer: dict[str, list[Notification] | None] = {}
        for index, (topic, since) in enumerate(positions.items()):
            epoch, now, entries, trimmed, info = replies[5 * index : 5 + 5 * index]
            book = self.book(epoch, info, trimmed, _now_us(now))
            if len(entries) > most or not complete(since, book):
                answer[topic] = None
            else:
                missed = [Notification.from_envelope(topic, f[b"n"]) for _i, f in entries]
                answer[topic] = missed if sum(n.size for n in missed) <= most_bytes else None
        return answer
