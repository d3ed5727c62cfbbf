"""What Redis Cluster changes in the Redis broker's data: cluster-safe key names (each topic's
keys in its own slot), the scripts' cluster variants, and the ``redis+cluster://`` URL.

The scripts themselves are :mod:`notifier.redis_history`'s; this module only hooks into them
(``check_scripts`` fails at import if they changed where it does).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from notifier.redis_history import PREFIX, PUBLISH_LUA, SESSION_LUA, KeyNames
from notifier.redis_topology import hosts_and_credentials

CLUSTER_SCHEME = "redis+cluster://"

# Before the id is made: if the topic's master changed since its bookkeeping was last touched,
# move its epoch past every id it had (see the module's docstring). The master key is named
# from the counter's (same hash tag, same slot).
_MASTER_CHECK = """
local master_key = string.sub(KEYS[1], 1, -4) .. 'master'
local info = redis.call('INFO', 'replication')
local replid = string.match(info, 'master_replid:(%w+)')
local known = redis.call('GET', master_key)
if replid and known ~= replid then
  if known then
    local c = tonumber(now[1]) * 1000000 + tonumber(now[2])
    local e = math.max(tonumber(redis.call('GET', KEYS[1]) or '0') + 1, c,
      tonumber(redis.call('GET', KEYS[2]) or '0'))
    redis.call('SET', KEYS[2], string.format('%.0f', e))
  end
  redis.call('SET', master_key, replid)
end
"""
_ANCHOR = "local last = redis.call('GET', KEYS[1])"
CLUSTER_PUBLISH_LUA = PUBLISH_LUA.replace(_ANCHOR, _MASTER_CHECK + _ANCHOR, 1).replace(
    "redis.call('PUBLISH',", "redis.call('SPUBLISH',", 1
)
# SESSION_LUA answering the epoch rather than the position: a history read's bookkeeping.
EPOCH_LUA = SESSION_LUA.rsplit("return", 1)[0] + "return redis.call('GET', KEYS[2])\n"
REJECT_LUA = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIREAT', KEYS[1], ARGV[3], 'GT')
redis.call('EXPIREAT', KEYS[1], ARGV[3], 'NX')
return 1
"""
REJECTIONS_KEY = PREFIX + "{rejections}"


def check_scripts() -> None:
    """Fail fast if the shared scripts changed where the cluster's variants hook into them."""
    if _ANCHOR not in PUBLISH_LUA or "redis.call('PUBLISH'," not in PUBLISH_LUA:
        raise RuntimeError("PUBLISH_LUA changed: update notifier.broker_cluster's variant")
    if not SESSION_LUA.rstrip().splitlines()[-1].startswith("return"):
        raise RuntimeError("SESSION_LUA changed: update notifier.broker_cluster's EPOCH_LUA")


check_scripts()


class ClusterKeys(KeyNames):
    """``notifier:{<topic>}:seq|epoch|master|history|idem:<k>``, channel ``notifier:{<topic>}``."""

    transactions = False

    def key(self, topic: str, what: str) -> str:
        return f"{PREFIX}{{{topic}}}:{what}"

    def channel(self, topic: str) -> str:
        return f"{PREFIX}{{{topic}}}"

    def history(self, topic: str) -> str:
        return self.key(topic, "history")

    def session(self, topic: str) -> list[str]:
        """The keys of SESSION_LUA (and EPOCH_LUA) for ``topic``."""
        return [self.key(topic, "seq"), self.key(topic, "epoch"), self.key(topic, "master")]

    def read_epoch(self, pipe: Any, topic: str) -> None:
        pipe.eval(EPOCH_LUA, 3, *self.session(topic), "1")

    def read_time(self, pipe: Any, topic: str) -> None:
        # TIME names no key (redis-py refuses it in a cluster pipeline): ask the topic's node.
        pipe.eval("return redis.call('TIME')", 1, self.history(topic))

    def request(self, key: str) -> str:
        """Where the first answer under a request's idempotency key is kept (its own slot)."""
        return f"{PREFIX}{{idem:{hashlib.sha256(key.encode()).hexdigest()}}}"


@dataclass(frozen=True, slots=True)
class ClusterURL:
    """``redis+cluster://[[user]:password@]host:port[,host:port...]``: seed nodes."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None


def parse_cluster_url(url: str) -> ClusterURL:
    """The parts of a ``redis+cluster://`` URL; ValueError (one line, no secret) when malformed."""
    if not url.startswith(CLUSTER_SCHEME):
        raise ValueError(f"must start with {CLUSTER_SCHEME}")
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError("takes no query string or fragment")
    if parts.path.strip("/"):
        raise ValueError("takes no path: a cluster has one database")
    username, password, nodes = hosts_and_credentials(parts.netloc, "seed node")
    return ClusterURL(tuple(nodes), username, password)
