"""Every Prometheus metric of an instance, on a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The outcome of every WebSocket handshake: accepted; unauthorized (missing, invalid or expired
# token); forbidden (scope or topic not allowed, malformed topics or since, too many topics);
# limited (429: the user's connections on this instance); unavailable (503: full, draining, broker down).
HANDSHAKE_OUTCOMES = ("accepted", "unauthorized", "forbidden", "limited", "unavailable")


class Metrics:
    """The contract's metrics (names fixed) plus a few of our own; labels stay low-cardinality."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge("notifier_connections", "Open WebSocket connections", registry=r)
        self.published = Counter(
            "notifier_notifications_published",
            "Notifications accepted by this instance (POST and WebSocket publish)",
            registry=r,
        )
        self.delivered = Counter(
            "notifier_notifications_delivered",
            "Notification frames written to clients by this instance",
            registry=r,
        )
        self.dropped = Counter(
            "notifier_notifications_dropped",
            "Notification frames not delivered, by reason",
            ["reason"],
            registry=r,
        )
        self.latency = Histogram(
            "notifier_delivery_latency_seconds",
            "Time from acceptance (ts) to the frame written on this instance",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.broker_connected = Gauge(
            "notifier_broker_connected", "1 while the broker is connected and subscribed", registry=r
        )
        self.rejected_handshakes = Counter(
            "notifier_handshakes_rejected",
            "WebSocket handshakes refused, by HTTP status",
            ["status"],
            registry=r,
        )
        self.handshakes = Counter(
            "notifier_handshakes",
            "WebSocket handshakes, by outcome (accepted, unauthorized, forbidden, limited, unavailable)",
            ["outcome"],
            registry=r,
        )
        self.resubscribes = Counter(
            "notifier_broker_resubscribes",
            "Times this instance subscribed its topics again on a new broker connection",
            registry=r,
        )
        self.probe_lag = Gauge(
            "notifier_broker_probe_lag_seconds",
            "Round trip of the last probe through the broker's pub/sub link (NaN: none back yet)",
            registry=r,
        )
        self.dropped_slow = self.dropped.labels("slow_consumer")
        # Pre-create the labels so a scrape shows 0 before the first drop or handshake.
        self.dropped_slow.inc(0)
        for outcome in HANDSHAKE_OUTCOMES:
            self.handshakes.labels(outcome).inc(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
