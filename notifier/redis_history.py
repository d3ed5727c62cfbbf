"""The Redis broker's data: key names, the publish script, and reading history back.

Each topic has a history stream (the last N notifications) and a trim mark (the highest id
trimmed away), both expiring with the topic. Reads come in
chunks, so a node never holds much more than the bytes it was asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

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

# Before a pub/sub session subscribes: the epoch, set to Redis's clock if missing (so that a
# recovery from before a wipe is known incomplete even before anything new is published), and
# the position every later id is this session's to deliver after: the id counter, or the epoch
# while nothing was published (never 0, which would mean "from the beginning").
SESSION_LUA = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  local now = redis.call('TIME')
  redis.call('SET', KEYS[2], string.format('%.0f', tonumber(now[1]) * 1000000 + tonumber(now[2])))
end
return redis.call('GET', KEYS[1]) or redis.call('GET', KEYS[2])
"""

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


class HistoryReader:
    """Reads topics' retained history from one Redis, kept as ``size`` entries for ``ttl`` s."""

    def __init__(self, redis: Redis, size: int, ttl: int) -> None:
        self.redis, self.size, self.ttl = redis, size, ttl

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
        key, mark = HISTORY_PREFIX + topic, TRIMMED_PREFIX + topic
        found: list[Notification] = []
        total, more, whole = 0, False, True
        cursor: bytes | None = None
        while len(found) < limit and not more:
            want = limit - len(found)
            if max_bytes < UNBOUNDED:
                average = total // len(found) if found else 0
                want = min(want, FIRST_CHUNK if not average else (max_bytes - total) // average + 1)
            async with self.redis.pipeline(transaction=True) as pipe:
                if since is None:
                    pipe.xrevrange(key, b"(" + cursor if cursor else "+", "-", count=want)
                else:
                    pipe.xrange(key, b"(" + cursor if cursor else f"({since}-0", "+", count=want)
                pipe.get(mark)
                if cursor is None:
                    pipe.get(EPOCH_KEY)
                    pipe.time()
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
        self, positions: dict[str, int], most: int
    ) -> dict[str, list[Notification] | None]:
        """For each topic, what was published after its position (at most ``most``), or None
        when that cannot be told whole (more than ``most``, or some of it lost)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(EPOCH_KEY)
            pipe.time()
            for topic, since in positions.items():
                pipe.xrange(HISTORY_PREFIX + topic, f"({since}-0", "+", count=most + 1)
                pipe.get(TRIMMED_PREFIX + topic)
                pipe.xinfo_stream(HISTORY_PREFIX + topic)
            replies = await pipe.execute(raise_on_error=False)
        _raise_first_error([r for i, r in enumerate(replies) if i < 2 or (i - 2) % 3 != 2])
        epoch, now = replies[0], _now_us(replies[1])
        answer: dict[str, list[Notification] | None] = {}
        for index, (topic, since) in enumerate(positions.items()):
            entries, trimmed, info = replies[2 + 3 * index : 5 + 3 * index]
            if len(entries) > most or not complete(since, self.book(epoch, info, trimmed, now)):
                answer[topic] = None
            else:
                answer[topic] = [Notification.from_envelope(topic, f[b"n"]) for _i, f in entries]
        return answer
