"""What the edges share: one instance's settings, token authority, node and metrics."""

from __future__ import annotations

from dataclasses import dataclass

from notifier.auth import TokenAuthority
from notifier.metrics import Metrics
from notifier.node import Node
from notifier.settings import Settings


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    authority: TokenAuthority
    node: Node
    metrics: Metrics
