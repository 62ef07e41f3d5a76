"""The engine: token ids and adapter slots in, token ids out. No HTTP, SQLite, tenants or files
beyond the base checkpoint."""

from .config import LORA_TARGETS, EngineConfig, ModelSpec, RopeSpec
from .engine import Engine, EngineStats
from .engine_thread import EngineDeadError, EngineThread
from .errors import AdapterShapeError, EngineError, InvalidRequestError, ModelLoadError
from .lora_slots import LoraModuleWeights, LoraWeights
from .outputs import RequestOutput
from .prefix_cache import PrefixScope
from .request import FinishReason, SamplingParams
from .sampler import TokenLogprobs
from .step_times import (
    STEP_KINDS,
    THREAD_ACTIVITIES,
    StepTotals,
    merge_seconds,
    merge_steps,
)

__all__ = [
    "LORA_TARGETS",
    "STEP_KINDS",
    "THREAD_ACTIVITIES",
    "AdapterShapeError",
    "Engine",
    "EngineConfig",
    "EngineDeadError",
    "EngineError",
    "EngineStats",
    "EngineThread",
    "FinishReason",
    "InvalidRequestError",
    "LoraModuleWeights",
    "LoraWeights",
    "ModelLoadError",
    "ModelSpec",
    "PrefixScope",
    "RequestOutput",
    "RopeSpec",
    "SamplingParams",
    "StepTotals",
    "TokenLogprobs",
    "merge_seconds",
    "merge_steps",
]
