"""Session fixtures: tiny bundles, each exported once per session and shared read-only.

``built(cell, layer_norm)`` exports on first use and caches, so running one test file pays only
for the bundles it uses. A test that damages a bundle must copy it first (``shutil.copytree``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from bundles import Built, build, make_checkpoint


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bool], Built]:
    import torch

    torch.set_num_threads(1)  # two shared cores: threads only add contention for models this small
    root = tmp_path_factory.mktemp("bundles")
    cache: dict[tuple[str, bool], Built] = {}

    def get(cell: str, layer_norm: bool) -> Built:
        if (cell, layer_norm) not in cache:
            cache[(cell, layer_norm)] = build(root, cell, layer_norm)
        return cache[(cell, layer_norm)]

    return get


@pytest.fixture(scope="session")
def lstm(built: Callable[[str, bool], Built]) -> Built:
    """The serve tests' model: a 2-layer LSTM with tied weights, scoring chunk 8."""
    return built("lstm", False)


@pytest.fixture(scope="session")
def lstm_bundle(lstm: Built) -> Path:
    return lstm.bundle


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer LSTM checkpoint: the cheapest model to trace, for exports that are meant to fail."""
    return make_checkpoint(tmp_path_factory.mktemp("small") / "ckpt", "lstm", False, num_layers=1)


@pytest.fixture
def small_products(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the tiny test models' products count as large, and time each form briefly."""
    from rnnlm.export import form_timing, quantize

    monkeypatch.setattr(quantize, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(form_timing, "TIME_PER_CANDIDATE", 0.003)
