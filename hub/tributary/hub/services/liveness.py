"""Is a spoke online? Derived from when the hub last heard from it (heartbeats, chiefly),
never stored as a flag, so a spoke that vanishes without a word still turns offline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tributary.hub.models import Spoke, utcnow

#: A spoke is online while the hub has heard from it within this many of its own heartbeat
#: intervals (one lost heartbeat is no outage).
MISSED_HEARTBEATS = 3


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def online_window(spoke: Spoke, window_seconds: float) -> timedelta:
    interval = spoke.heartbeat_interval_s or 0.0
    return timedelta(seconds=max(window_seconds, MISSED_HEARTBEATS * interval))


def is_online(spoke: Spoke, window_seconds: float, now: datetime | None = None) -> bool:
    seen = _aware(spoke.last_seen_at)
    return seen is not None and (now or utcnow()) - seen <= online_window(spoke, window_seconds)


def offline_since(spoke: Spoke, window_seconds: float) -> datetime | None:
    """When the spoke was last heard of, if it is offline now (None: online or never seen)."""
    return None if is_online(spoke, window_seconds) else _aware(spoke.last_seen_at)
