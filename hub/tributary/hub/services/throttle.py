"""Sign-in throttling: failed attempts counted per username and per client address in a
sliding window. Kept in the hub's database (:class:`SignInFailure`), so every web process of
a hub counts the same failures: N processes allow the limit once, not N times, and a restart
forgets nothing. Works alike on SQLite and PostgreSQL (plain indexed queries)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from sqlalchemy import delete, func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from tributary.hub.models import SignInFailure


class SignInThrottle:
    """Refuses attempts for a user or an address once it has failed too often recently."""

    def __init__(self, engine: Engine, window_seconds: float, max_per_user: int,
                 max_per_address: int, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.window = window_seconds
        self.limits = {"user": max_per_user, "address": max_per_address}
        self.clock = clock  # wall clock: the processes sharing the database share it

    @staticmethod
    def _keys(username: str, address: str) -> list[tuple[str, str]]:
        return [("user", username.casefold()), ("address", address)]

    def retry_after(self, username: str, address: str) -> int | None:
        """Seconds until an attempt is allowed again, or None when it is allowed now."""
        now = self.clock()
        waits = []
        with Session(self.engine) as session:
            for kind, key in self._keys(username, address):
                limit = self.limits[kind]
                # The limit-th most recent failure in the window decides when one expires.
                times = session.exec(
                    select(SignInFailure.at).where(
                        SignInFailure.kind == kind, SignInFailure.key == key,
                        col(SignInFailure.at) > now - self.window)
                    .order_by(col(SignInFailure.at).desc()).limit(limit)).all()
                if len(times) >= limit:
                    waits.append(times[-1] + self.window - now)
        return max(1, math.ceil(max(waits))) if waits else None

    def failed(self, username: str, address: str) -> None:
        now = self.clock()
        with Session(self.engine) as session:
            for kind, key in self._keys(username, address):
                session.add(SignInFailure(kind=kind, key=key, at=now))
            # Failures older than the window count for nothing: tidy up (indexed on ``at``).
            session.execute(delete(SignInFailure).where(
                col(SignInFailure.at) <= now - self.window))
            session.commit()

    def succeeded(self, username: str) -> None:
        """A correct password clears the user's count (never the address's)."""
        with Session(self.engine) as session:
            session.execute(delete(SignInFailure).where(
                SignInFailure.kind == "user", SignInFailure.key == username.casefold()))
            session.commit()

    def failures(self) -> int:
        """Failures recorded and not yet tidied away (for tests and operators)."""
        with Session(self.engine) as session:
            return session.exec(select(func.count(col(SignInFailure.id)))).one()
