"""ReplicaBoard: how the front and the engine replicas see each other beyond single requests.

Ray Serve routes each request to one replica and offers no broadcast. The board is one small
Ray actor per application: every replica reports what it holds and how loaded it is twice a
second and, in the same call, picks up the commands the front posted since its last report
(evict an adapter, unpin one, forget cached KV). The front reads the reports for /metrics, the
admin API and readiness. Commands reach every live replica within a report period; a replica
that starts later has nothing to undo, so it starts from the newest command.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray

from .wire import BOARD_NAMESPACE, board_name

log = logging.getLogger(__name__)
REPORT_PERIOD_S = 0.5
STALE_AFTER_S = 5.0  # a replica silent this long is dead or gone
_MAX_COMMANDS = 10_000


@dataclass
class Report:
    """One replica's state: `stats` an EngineStats whose slots are adapter ids, `pool` its
    EntryStates (keys are adapter ids), `host` (adapter id, bytes) LRU first."""

    replica_id: str
    alive: bool
    error: str | None
    stats: Any
    pool: list = field(default_factory=list)
    host: list[tuple[int, int]] = field(default_factory=list)
    pool_metrics: dict = field(default_factory=dict)
    at: float = 0.0  # set by the board when it arrives


class ReplicaBoard:
    """The actor: the newest report of each replica, and a numbered list of commands."""

    def __init__(self) -> None:
        self._reports: dict[str, Report] = {}
        self._commands: deque[tuple[int, str, Any]] = deque(maxlen=_MAX_COMMANDS)
        self._seq = 0

    def report(self, report: Report, seen: int) -> tuple[int, list[tuple[str, Any]]]:
        """Store a replica's report; return the newest command number and the commands
        after `seen` (none for a replica's first report, seen = -1)."""
        report.at = time.time()
        self._reports[report.replica_id] = report
        if seen < 0:
            return self._seq, []
        return self._seq, [(kind, arg) for n, kind, arg in self._commands if n > seen]

    def post(self, kind: str, arg: Any) -> int:
        """Queue a command for every replica: evict, unpin (adapter id), forget_prefix."""
        self._seq += 1
        self._commands.append((self._seq, kind, arg))
        return self._seq

    def reports(self) -> list[Report]:
        """The reports of replicas heard from within STALE_AFTER_S."""
        now = time.time()
        for replica_id, r in list(self._reports.items()):
            if now - r.at > STALE_AFTER_S:
                del self._reports[replica_id]
        return list(self._reports.values())


def open_board(app_name: str):
    """The application's board actor, created if missing (owned by the caller's process)."""
    actor = ray.remote(num_cpus=0, max_restarts=-1)(ReplicaBoard)
    return actor.options(
        name=board_name(app_name), namespace=BOARD_NAMESPACE, get_if_exists=True
    ).remote()


def find_board(app_name: str):
    """The application's board actor, or None while the front has not created it."""
    try:
        return ray.get_actor(board_name(app_name), namespace=BOARD_NAMESPACE)
    except ValueError:
        return None


class FleetView:
    """The front's cached copy of the board's reports, refreshed by a daemon thread."""

    def __init__(self, board, period_s: float = REPORT_PERIOD_S) -> None:
        self.board = board
        self.period_s = period_s
        self._reports: list[Report] = []
        self._heard = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="loraplex-fleet", daemon=True
        )

    def start(self) -> FleetView:
        self.refresh()
        self._thread.start()
        return self

    def refresh(self) -> None:
        try:
            self._reports = ray.get(self.board.reports.remote(), timeout=10)
            self._heard = True
        except Exception:  # the board restarts; keep the last reports
            log.warning("replica board did not answer", exc_info=True)

    def reports(self) -> list[Report]:
        """Live replicas, by replica id."""
        return sorted(self._reports, key=lambda r: r.replica_id)

    def post(self, kind: str, arg: Any) -> None:
        """Send a command to every replica (fire and forget: it is applied within ~0.5 s)."""
        self.board.post.remote(kind, arg)

    def wait_for(self, count: int, timeout_s: float) -> bool:
        """Wait until `count` replicas report alive (startup, tests)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.refresh()
            if sum(r.alive for r in self._reports) >= count:
                return True
            time.sleep(self.period_s / 2)
        return False

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.refresh()
