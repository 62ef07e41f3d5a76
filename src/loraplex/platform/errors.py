"""The engine's errors: each names what was wrong and how to fix it. None of them stops the engine."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on bad input."""


class ModelLoadError(EngineError):
    """The checkpoint is missing, corrupt, of an unsupported architecture, or lacks a tensor."""


class InvalidRequestError(EngineError, ValueError):
    """A request the engine cannot run: too long for the context, bad sampling values, bad slot."""


class AdapterShapeError(EngineError, ValueError):
    """Adapter tensors that do not fit this base model or the engine's LoRA slots."""
