"""The tiny checkpoints loaded once per test session for the prompt tests (2 text heads, as the fixtures)."""

from __future__ import annotations

from tritonsd.model.load import load_model

_CACHE: dict[str, object] = {}


def tiny_model(fixtures, name: str):
    if name not in _CACHE:
        _CACHE[name] = load_model(fixtures / f"{name}.safetensors", fixtures / f"{name}.yaml", text_heads=2)
    return _CACHE[name]
