"""A load generator for OpenAI-compatible servers (`loraplex bench serve`) and random adapters
for them (`loraplex bench adapters`); an HTTP client that imports nothing of the engine."""

from .adapters import BaseShapes, UploadReport, random_adapter, upload_adapters
from .client import RequestRecord
from .report import format_table, parse_goodput, summarize
from .runner import BenchConfig, BenchResult, arun, run_benchmark
from .workload import (
    LengthDist,
    RequestSpec,
    WorkloadConfig,
    adapter_names,
    generate,
    load_dataset,
    popularity_weights,
)

__all__ = [
    "BaseShapes",
    "BenchConfig",
    "BenchResult",
    "LengthDist",
    "RequestRecord",
    "RequestSpec",
    "UploadReport",
    "WorkloadConfig",
    "adapter_names",
    "arun",
    "format_table",
    "generate",
    "load_dataset",
    "parse_goodput",
    "popularity_weights",
    "random_adapter",
    "run_benchmark",
    "summarize",
    "upload_adapters",
]
