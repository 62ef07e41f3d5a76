"""The process the crash test kills: ingests, deletes and collects adapters until SIGKILL."""

from __future__ import annotations

import io
import random
from pathlib import Path

from registry_files import open_registry

from loraplex.adapters_registry import RegistryError, UploadPart
from loraplex.platform import ModelSpec

Upload = tuple[str, list[tuple[str, bytes]]]  # adapter name, (file name, bytes) parts


def run_until_killed(
    data_dir: Path, model_dir: Path, uploads: list[Upload], seed: int, started
) -> None:
    registry = open_registry(data_dir, ModelSpec.from_dir(model_dir))
    try:
        tenant = registry.tenants.by_name("acme")
    except RegistryError:
        tenant = registry.tenants.create("acme")
    started.set()
    rng = random.Random(seed)
    while True:
        name, parts = rng.choice(uploads)
        try:
            if rng.random() < 0.2:
                registry.delete(tenant.id, name)
                registry.collect(lambda _: False)
            else:
                streams = [UploadPart(f, io.BytesIO(data)) for f, data in parts]
                registry.ingest(tenant.id, name, streams)
        except RegistryError:
            pass  # refused uploads and deleting what is gone are part of the mix
