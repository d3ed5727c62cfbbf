"""notifier: a horizontally scaled real-time notification service."""

__version__ = "0.1.0"
