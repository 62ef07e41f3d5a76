"""AdminUiState: what the composition root hands the admin UI, so the UI never imports the API.

The metrics registry, the engine thread and the API's draining flag belong to other layers;
`loraplex.serve` passes them in here as plain values and callables.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: importing the engine would import torch
    from prometheus_client import CollectorRegistry

    from loraplex.adapters_registry import AdminKeyStore, RegistryServices
    from loraplex.platform import EngineThread


@dataclass(frozen=True)
class AdminUiState:
    """The server's parts the UI reads and steers (built by `loraplex.serve`)."""

    services: RegistryServices
    engine_thread: EngineThread
    metrics_registry: CollectorRegistry  # the API's vLLM-style series
    admin_keys: AdminKeyStore  # the one admin key, hashed
    model_name: str  # the base model's served name
    started_at: float = field(default_factory=time.time)
    is_draining: Callable[[], bool] = lambda: False
    max_upload_bytes: int = 1 << 30
    session_idle_s: float = 8 * 3600  # a session unused this long signs out
    session_max_s: float = 24 * 3600  # and none lives longer than this
