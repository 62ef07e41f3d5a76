"""The embedded demo: a tiny checkpoint and three adapters, built on the machine without downloads."""

from .assets import ADAPTERS, BASE_REPLY, QUESTIONS, DemoAdapter, DemoAssets, build_demo

__all__ = [
    "ADAPTERS",
    "BASE_REPLY",
    "QUESTIONS",
    "DemoAdapter",
    "DemoAssets",
    "build_demo",
]
