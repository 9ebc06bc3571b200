"""The portable state: a context as JSON-ready data, and back (``GET /v1/sessions/{id}/state``,
``POST /v1/sessions`` with a state, ``LanguageModel.export_context`` / ``import_context``).

    {"format": "rnnlm-state", "version": 1, "bundle_sha256": ..., "tokens": N, "last_token": id,
     "shapes": {"state.0.h": [1, 256], ...}, "state": base64 of little-endian float32 arrays in the
     manifest's order, "sha256": over all of the above}

The sha256 detects alteration and truncation (integrity, not authentication); an import is refused,
with the reason, when the state comes from another bundle, has other shapes, was altered or truncated,
or holds a value that is not finite.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

import numpy as np
from rnnlm.serve.values import Context, State, StateError

STATE_FORMAT = "rnnlm-state"


def export_context(ctx: Context, bundle_sha256: str, states: list[dict[str, Any]]) -> dict[str, Any]:
    """``ctx`` of a model whose bundle is ``bundle_sha256`` and whose state layout is ``states`` (the
    manifest's), as JSON-ready data."""
    data = ctx.state.to_bytes()
    out = {"format": STATE_FORMAT, "version": 1, "bundle_sha256": bundle_sha256, "tokens": ctx.tokens,
           "last_token": ctx.last, "shapes": _shapes(states), "state": base64.b64encode(data).decode("ascii")}
    out["sha256"] = state_digest(out, data)
    return out


def import_context(exported: Any, bundle_sha256: str, states: list[dict[str, Any]], vocab_size: int) -> Context:
    """The context ``export_context`` wrote, for the model it describes; ``StateError`` with the reason."""
    if not isinstance(exported, dict) or exported.get("format") != STATE_FORMAT or exported.get("version") != 1:
        raise StateError(f"not an exported state (expected format {STATE_FORMAT!r} version 1)")
    if exported.get("bundle_sha256") != bundle_sha256:
        raise StateError("the state was exported from another model (its bundle_sha256 differs from this "
                         f"model's {bundle_sha256[:16]}...)")
    shapes = _shapes(states)
    if exported.get("shapes") != shapes:
        raise StateError(f"the state's shapes {exported.get('shapes')} are not this model's {shapes}")
    tokens, last = exported.get("tokens"), exported.get("last_token")
    if type(tokens) is not int or tokens < 0 or type(last) is not int or not 0 <= last < vocab_size:
        raise StateError(f"tokens must be an integer >= 0 and last_token a token id below {vocab_size}")
    data = _state_bytes(exported, states)
    values = np.frombuffer(data, "<f4").astype(np.float32)
    if not np.isfinite(values).all():
        raise StateError("the state holds values that are not finite")
    arrays, at = {}, 0
    for s in states:
        arrays[s["input"]] = values[at : at + s["size"]].reshape(1, s["size"]).copy()
        at += s["size"]
    return Context(State(arrays), last, tokens)


def _state_bytes(exported: dict[str, Any], states: list[dict[str, Any]]) -> bytes:
    """The state's bytes, refused when they are not base64, not this layout's length, or not what the
    sha256 says."""
    try:
        data = base64.b64decode(str(exported.get("state")), validate=True)
    except (binascii.Error, ValueError):
        raise StateError("the state's bytes are not valid base64") from None
    want = 4 * sum(s["size"] for s in states)
    if len(data) != want:
        raise StateError(f"the state is {len(data)} bytes; this model's is {want} (truncated or foreign)")
    if exported.get("sha256") != state_digest(exported, data):
        raise StateError("the state does not match its sha256: it was altered after export")
    return data


def _shapes(states: list[dict[str, Any]]) -> dict[str, list[int]]:
    return {s["input"]: [1, s["size"]] for s in states}


def state_digest(exported: dict[str, Any], data: bytes) -> str:
    """sha256 over what an exported state says: the bundle, the counts, the shapes and the bytes."""
    head = json.dumps([exported.get("bundle_sha256"), exported.get("tokens"), exported.get("last_token"),
                       exported.get("shapes")], sort_keys=True)
    return hashlib.sha256(head.encode() + b"\0" + data).hexdigest()
