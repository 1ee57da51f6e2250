"""Sign-in throttling: failed attempts counted per username and per client address in a
sliding window. Kept in the hub process's memory (each API replica counts its own; a
restart forgets), which bounds online guessing without a shared store."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable


class SignInThrottle:
    """Refuses attempts for a user or an address once it has failed too often recently."""

    def __init__(self, window_seconds: float, max_per_user: int, max_per_address: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window_seconds
        self.limits = {"user": max_per_user, "address": max_per_address}
        self.clock = clock
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, username: str, address: str) -> int | None:
        """Seconds until an attempt is allowed again, or None when it is allowed now."""
        now = self.clock()
        waits = []
        with self._lock:
            for kind, key in (("user", username.casefold()), ("address", address)):
                failures = self._recent((kind, key), now)
                if len(failures) >= self.limits[kind]:
                    waits.append(failures[-self.limits[kind]] + self.window - now)
        return max(1, math.ceil(max(waits))) if waits else None

    def failed(self, username: str, address: str) -> None:
        now = self.clock()
        with self._lock:
            for key in (("user", username.casefold()), ("address", address)):
                self._recent(key, now).append(now)
            if len(self._failures) > 100_000:  # many distinct names or addresses: tidy up
                for key in [k for k, v in self._failures.items() if not v]:
                    del self._failures[key]

    def succeeded(self, username: str) -> None:
        """A correct password clears the user's count (never the address's)."""
        with self._lock:
            self._failures.pop(("user", username.casefold()), None)

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        failures = self._failures.setdefault(key, deque())
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        return failures
