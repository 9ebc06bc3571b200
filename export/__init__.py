"""torch -> ONNX: writes a validated model bundle (``rnnlm.export``). Imports torch lazily."""

from __future__ import annotations

from typing import Any


def export_bundle(*args: Any, **kwargs: Any) -> Any:
    from rnnlm.export.exporter import export_bundle as run

    return run(*args, **kwargs)


__all__ = ["export_bundle"]
