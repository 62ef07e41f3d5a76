"""Sign-in sessions of the admin UI, kept in server memory.

The cookie carries a random session id (256 bits), never the admin key; the server stores only
the id's SHA-256, so a leaked memory dump or log line of the table cannot be replayed as a
cookie. Each session has its own CSRF token. Sessions end on sign-out, after `idle_s` unused,
or `max_s` after sign-in; a restart signs everyone out, which is acceptable for an operators'
console and keeps the key's hash the only secret on disk.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_SESSIONS = 256  # the oldest session goes when one more signs in


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Session:
    """One signed-in browser."""

    csrf: str
    created_at: float
    seen_at: float
    flashes: list[dict] = field(default_factory=list)  # messages shown once, next page


class SessionStore:
    """Random session ids → sessions; thread-safe."""

    def __init__(
        self,
        idle_s: float,
        max_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_s = idle_s
        self.max_s = max_s
        self.clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def create(self) -> tuple[str, Session]:
        """A new session; returns (the cookie value, the session)."""
        token = secrets.token_urlsafe(32)
        now = self.clock()
        session = Session(secrets.token_urlsafe(32), now, now)
        with self._lock:
            self._expire(now)
            while len(self._sessions) >= MAX_SESSIONS:
                del self._sessions[next(iter(self._sessions))]
            self._sessions[_digest(token)] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        """The live session of a cookie value, or None."""
        if not token:
            return None
        now = self.clock()
        with self._lock:
            self._expire(now)
            session = self._sessions.get(_digest(token))
            if session is not None:
                session.seen_at = now
            return session

    def end(self, token: str | None) -> None:
        """Sign out: the cookie value stops working at once."""
        if token:
            with self._lock:
                self._sessions.pop(_digest(token), None)

    def _expire(self, now: float) -> None:
        dead = [
            key
            for key, s in self._sessions.items()
            if now - s.seen_at > self.idle_s or now - s.created_at > self.max_s
        ]
        for key in dead:
            del self._sessions[key]


class SignInThrottle:
    """At most `limit` failed sign-ins per client address in `window_s` seconds.

    An operator may choose a short admin key; this keeps guessing it over HTTP slow without
    letting one address lock everybody else out.
    """

    def __init__(
        self,
        limit: int = 10,
        window_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}

    def blocked(self, client: str) -> bool:
        """Whether this address has used up its failures for now."""
        with self._lock:
            return len(self._recent(client)) >= self.limit

    def failed(self, client: str) -> None:
        with self._lock:
            self._recent(client).append(self.clock())
            if (
                len(self._failures) > 10_000
            ):  # bounded memory under a spray of addresses
                self._failures.clear()

    def _recent(self, client: str) -> deque[float]:
        times = self._failures.setdefault(client, deque())
        while times and self.clock() - times[0] > self.window_s:
            times.popleft()
        return times
