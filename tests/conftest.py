"""Shared fixtures. Keep this file small: each fixture here is used by several test layers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`{"tiny-v1": dir, "tiny-v2": dir}`: two versions of a tiny Llama vLLM can serve.

    Set `TURNOUT_TEST_MODELS_DIR` to reuse models across runs (making them takes ~10 s).
    """
    from turnout.tinymodels import ensure_tiny_models

    cached = os.environ.get("TURNOUT_TEST_MODELS_DIR")
    root = Path(cached) if cached else tmp_path_factory.mktemp("models")
    return ensure_tiny_models(root)
