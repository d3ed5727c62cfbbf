"""Presence kept in Redis (one server, Sentinel, Cluster): see :mod:`notifier.presence`.

Keys, under a prefix in the control topic's slot (so a cluster runs each call on one shard):

- ``node:<id>``: hash ``"<topic>\\n<user>"`` -> that node's connections (a topic name has no
  line break; the user, which may, comes last);
- ``total:<topic>``: hash user -> the deployment's connections; ``users:<topic>``: the same
  users in a sorted set (score 0: by name), for a listing in order without sorting;
- ``nodes``: sorted set node id -> its last heartbeat (ms, Redis's clock);
- ``swept:<id>:<ms>`` (and the set ``sweeps`` naming them): the counts of a node declared dead,
  taken apart a chunk per heartbeat of any live node.

Every key expires (``KEY_TTL``) unless kept alive: a node's own keys by its heartbeat, a topic's
by each change and by the heartbeats of the nodes holding it.

One script does a change and publishes its events on the control topic in the same atomic step
(``PUBLISH_LUA`` runs as a function after it, with the events as its data): events reach every
node in the order they happened, and none is published for a change that did not happen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from notifier.broker import CONTROL_TOPIC, IDEMPOTENCY_TTL, PRESENCE_DEAD_AFTER, PresenceChange, PresenceState
from notifier.errors import BrokerUnavailable

KEY_TTL = 86400  # seconds an unrefreshed presence key lives (a deployment all of whose nodes died)
SWEEP_CHUNK = 256  # counts of dead nodes one heartbeat takes apart
NO_DEADLINE = "99999999999999"

# ARGV 1-7 are PUBLISH_LUA's (ARGV[1], the frame's tail, is made here from the events);
# ARGV[8] key prefix, [9] mode ("update", "beat", "bye"), [10] node id, [11] key ttl,
# [12] ms without a heartbeat before a node is swept, [13] sweep chunk, [14...] the mode's:
# update: (topic, user, count) triples; beat: topics to keep alive.
# Returns {"", 3, flag} when there is no event to publish, else PUBLISH_LUA's answer plus flag;
# flag: 1 when this node was unknown (new, or swept as dead): it must send all its counts again.
_PRESENCE_HEAD = """
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[6]) then
  return {'', 2, 0}
end
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local P, mode, node, ttl = ARGV[8], ARGV[9], ARGV[10], tonumber(ARGV[11])
local nodes, mine, sweeps = P .. 'nodes', P .. 'node:' .. node, P .. 'sweeps'
local events, flag = {}, 0
local function change(topic, user, delta)
  local totals, users = P .. 'total:' .. topic, P .. 'users:' .. topic
  local total = redis.call('HINCRBY', totals, user, delta)
  if total <= 0 then
    redis.call('HDEL', totals, user)
    if redis.call('ZREM', users, user) == 1 then events[#events + 1] = {topic, 'leave', user} end
  else
    if redis.call('ZADD', users, 'NX', 0, user) == 1 then events[#events + 1] = {topic, 'join', user} end
    redis.call('EXPIRE', totals, ttl)
    redis.call('EXPIRE', users, ttl)
  end
end
local function bury(id)
  local key = P .. 'node:' .. id
  if redis.call('EXISTS', key) == 1 then
    local swept = P .. 'swept:' .. id .. ':' .. ms
    redis.call('RENAME', key, swept)
    redis.call('SADD', sweeps, swept)
  end
end
local function sweep(budget)
  for _, swept in ipairs(redis.call('SMEMBERS', sweeps)) do
    if budget <= 0 then break end
    local found = redis.call('HSCAN', swept, 0, 'COUNT', budget)[2]
    for i = 1, #found, 2 do
      local cut = string.find(found[i], '\\n', 1, true)
      change(string.sub(found[i], 1, cut - 1), string.sub(found[i], cut + 1), -tonumber(found[i + 1]))
      redis.call('HDEL', swept, found[i])
      budget = budget - 1
    end
    if redis.call('EXISTS', swept) == 0 then redis.call('SREM', sweeps, swept) end
  end
  if redis.call('EXISTS', sweeps) == 1 then redis.call('EXPIRE', sweeps, ttl) end
end
if mode == 'update' then
  flag = redis.call('ZADD', nodes, ms, node)
  for i = 14, #ARGV, 3 do
    local field, count = ARGV[i] .. '\\n' .. ARGV[i + 1], tonumber(ARGV[i + 2])
    local old = tonumber(redis.call('HGET', mine, field) or '0')
    if count ~= old then
      if count > 0 then redis.call('HSET', mine, field, count) else redis.call('HDEL', mine, field) end
      change(ARGV[i], ARGV[i + 1], count - old)
    end
  end
  if redis.call('EXISTS', mine) == 1 then redis.call('EXPIRE', mine, ttl) end
elseif mode == 'beat' then
  flag = redis.call('ZADD', nodes, ms, node)
  redis.call('EXPIRE', nodes, ttl)
  if redis.call('EXISTS', mine) == 1 then redis.call('EXPIRE', mine, ttl) end
  for i = 14, #ARGV do
    redis.call('EXPIRE', P .. 'total:' .. ARGV[i], ttl)
    redis.call('EXPIRE', P .. 'users:' .. ARGV[i], ttl)
  end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', nodes, '-inf', ms - tonumber(ARGV[12]))) do
    redis.call('ZREM', nodes, id)
    bury(id)
  end
  sweep(tonumber(ARGV[13]))
else
  redis.call('ZREM', nodes, node)
  bury(node)
  sweep(tonumber(ARGV[13]))
end
if #events == 0 then return {'', 3, flag} end
ARGV[1] = '","topic":"' .. ARGV[4] .. '","data":' .. cjson.encode({type = 'presence', events = events})
  .. ',"ts":' .. ARGV[2] .. '}'
ARGV[6] = '""" + NO_DEADLINE + """'
local function publish()
"""
_PRESENCE_TAIL = """
end
local answer = publish()
return {answer[1], answer[2], flag}
"""

QUERY_LUA = """
local users = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local counts = {}
if #users > 0 then counts = redis.call('HMGET', KEYS[2], unpack(users)) end
return {redis.call('ZCARD', KEYS[1]), users, counts}
"""


def presence_script(publish_lua: str) -> str:
    """The presence script over ``publish_lua`` (the topology's publish script)."""
    return _PRESENCE_HEAD + publish_lua + _PRESENCE_TAIL


class RedisPresence:
    """Presence calls of one node, over a Redis client that routes by key (a cluster client
    too: every key is in the control topic's slot).

    ``control_keys`` are the publish script's KEYS for the control topic; ``deadline`` gives
    the publish script's deadline (ARGV[6]); ``guard`` maps failures to BrokerUnavailable.
    """

    def __init__(
        self,
        redis: Any,
        publish_lua: str,
        control_keys: list[str],
        prefix: str,
        node: str,
        settings: tuple[int, int],
        deadline: Callable[[], str],
        guard: Callable[[], AbstractAsyncContextManager[None]],
    ) -> None:
        self._script = redis.register_script(presence_script(publish_lua))
        self._query = redis.register_script(QUERY_LUA)
        self._keys = control_keys
        self._prefix = prefix
        self._node = node
        self._history_size, self._history_ttl = settings
        self._deadline = deadline
        self._guard = guard

    async def _run(self, mode: str, extra: list[Any]) -> bool:
        args: list[Any] = [
            "",
            time.time_ns() // 1_000_000,
            IDEMPOTENCY_TTL,
            CONTROL_TOPIC,
            self._history_size,
            self._deadline(),
            self._history_ttl,
            self._prefix,
            mode,
            self._node,
            KEY_TTL,
            PRESENCE_DEAD_AFTER * 1000,
            SWEEP_CHUNK,
            *extra,
        ]
        async with self._guard():
            reply = await self._script(keys=self._keys, args=args)
        if reply[1] == 2:
            raise BrokerUnavailable("redis: too slow to answer; presence not changed")
        return bool(reply[2])

    async def update(self, changes: list[PresenceChange]) -> bool:
        return await self._run("update", [part for change in changes for part in change])

    async def beat(self, topics: list[str]) -> bool:
        return await self._run("beat", list(topics))

    async def goodbye(self) -> None:
        await self._run("bye", [])

    async def query(self, topic: str, limit: int) -> PresenceState:
        keys = [f"{self._prefix}users:{topic}", f"{self._prefix}total:{topic}"]
        async with self._guard():
            count, users, counts = await self._query(keys=keys, args=[limit])
        listed = [(u.decode(), int(c or 0)) for u, c in zip(users, counts, strict=True)]
        return PresenceState(int(count), listed)


class PresenceOfRedis:
    """The broker's presence methods (``notifier.broker.Broker``), for the Redis brokers: each is
    its :class:`RedisPresence`'s."""

    _presence: RedisPresence

    async def presence_update(self, changes: list[PresenceChange]) -> bool:
        return await self._presence.update(changes)

    async def presence_beat(self, topics: list[str]) -> bool:
        return await self._presence.beat(topics)

    async def presence_goodbye(self) -> None:
        await self._presence.goodbye()

    async def presence(self, topic: str, limit: int) -> PresenceState:
        return await self._presence.query(topic, limit)
