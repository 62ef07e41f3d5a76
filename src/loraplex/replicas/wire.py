"""What crosses Ray between the API front and the engine replicas: plain, picklable values.

A call's requests travel together as one `Job`, so that the n choices of one API call run in
one replica's batch and the call has one replica id to report. The adapter travels as an
`AdapterSource`: its registry id (the multiplexing key), its sha256 and a reference to its
verified files in Ray's object store, fetched by a replica only when it does not hold it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraplex.platform import ModelSpec, PrefixScope, SamplingParams

ENGINE_DEPLOYMENT = "EngineReplica"
FRONT_DEPLOYMENT = "Front"
BOARD_NAMESPACE = "loraplex"


def board_name(app_name: str) -> str:
    """The name of an application's ReplicaBoard actor (in BOARD_NAMESPACE)."""
    return f"loraplex-board:{app_name}"


@dataclass(frozen=True)
class AdapterSource:
    """Where a replica gets an adapter: `key` is its registry id as text (Ray Serve's
    multiplexed model id), `digest` its registry sha256, `payload` an ObjectRef to the
    (adapter_config.json, adapter_model.safetensors) bytes the registry verified."""

    key: str
    digest: str
    payload: Any  # ray.ObjectRef[tuple[bytes, bytes]]; Any keeps ray out of this module


@dataclass(frozen=True)
class RemoteRequest:
    """One engine request of a call (one prompt × one choice)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    scope: PrefixScope | None


@dataclass(frozen=True)
class Job:
    """The requests of one API call, all under the same adapter (None: the base model)."""

    requests: tuple[RemoteRequest, ...]
    adapter: AdapterSource | None


@dataclass(frozen=True)
class Accepted:
    """A replica's first answer to a Job: every request is queued in its engine."""

    replica_id: str


@dataclass(frozen=True)
class Refused:
    """A replica's first answer when it cannot take the Job: the error the API maps
    (InvalidRequestError, a RegistryError such as PoolExhausted, EngineDeadError)."""

    error: Exception


@dataclass(frozen=True)
class ReplicaFacts:
    """What the front needs of the engine without loading the model itself."""

    spec: ModelSpec
    max_model_len: int
    max_lora_rank: int
    max_num_seqs: int
    max_loras: int
    device: str
