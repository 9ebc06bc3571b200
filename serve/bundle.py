"""Reading a bundle: the manifest is the whole contract with the exporter.

Before anything runs, every check a deployment needs: the format version, the sha256 and size
of every file, the graphs' inputs and outputs against the manifest, the vocabulary against the
logits dimension; the probe (a fixed input with its expected outputs) is run by the runtime.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rnnlm.errors import RnnlmError
from rnnlm.text import TextSpec
from rnnlm.vocab import Vocabulary

FORMAT = "rnnlm-bundle"
SUPPORTED_VERSIONS = (1,)
MANIFEST = "manifest.json"
GRAPH_SUFFIXES = (".onnx",)


class BundleError(RnnlmError):
    """A bundle that cannot be trusted: the message names the file and the check."""


def find_bundle(path: str | Path | None, search_root: str | Path = "models") -> Path:
    """A bundle directory itself, a model directory holding ``onnx/`` (or ``onnx-quant/``, ``onnx-int8/``), or, with
    no path, the most recently exported bundle under ``search_root``."""
    if path is None:
        root = Path(search_root)
        manifests = sorted(root.glob(f"**/{MANIFEST}"), key=lambda p: p.stat().st_mtime, reverse=True) if root.is_dir() else []
        if not manifests:
            raise BundleError(f"no exported model under ./{root}: run `rnnlm export --cell C` first, or pass --model DIR")
        return manifests[0].parent
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    for sub in ("onnx", "onnx-quant", "onnx-int8"):
        if (p / sub / MANIFEST).is_file():
            return p / sub
    if not p.exists():
        raise BundleError(f"no model at {p}")
    raise BundleError(f"{p} is not a bundle: no {MANIFEST} in it or in {p}/onnx (export one with `rnnlm export`)")


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]
    # file name -> the future of its verification (its bytes for a graph, else None): see ``open``
    _pending: dict[str, Future[bytes | None]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def open(cls, path: str | Path | None, *, verify_hashes: bool | str = True) -> Bundle:
        """Open and check a bundle's manifest. ``verify_hashes``: True checks every file's size and sha256
        now; "background" starts those checks on threads (hashlib releases the GIL) and returns, and
        ``verify_files`` or ``verified_bytes`` wait for them: the runtime creates its first session while
        the other files are hashed, and calls ``verify_files`` before it returns."""
        directory = find_bundle(path)
        mpath = directory / MANIFEST
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{mpath}: not an rnnlm bundle manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
        version = manifest.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            raise BundleError(f"{mpath}: unknown manifest format version {version!r} "
                              f"(this rnnlm reads {', '.join(map(str, SUPPORTED_VERSIONS))})")
        for key in ("files", "graphs", "state", "vocab", "text", "probe"):
            if key not in manifest:
                raise BundleError(f"{mpath}: the manifest has no {key!r} entry")
        bundle = cls(directory, manifest)
        if verify_hashes:
            bundle._start_verification()
            if verify_hashes != "background":
                bundle.verify_files()
        return bundle

    def _start_verification(self) -> None:
        names = list(self.manifest["files"])
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rnnlm-hash")
        score = self.manifest["graphs"].get("score", {}).get("file")

        def first(n: str) -> int:  # what the first session waits for goes first
            return 0 if n == score else 1 if n.endswith(GRAPH_SUFFIXES) else 2

        for name in sorted(names, key=first):
            self._pending[name] = pool.submit(self._read_verified, name)
        pool.shutdown(wait=False)  # the threads finish the queued checks, then exit

    def _read_verified(self, name: str) -> bytes | None:
        """The file's bytes after checking its size and sha256 against the manifest (None for a non-graph)."""
        meta = self.manifest["files"][name]
        f = self.path / name
        try:
            data = f.read_bytes()
        except FileNotFoundError:
            raise BundleError(f"{f}: missing (listed in {MANIFEST})") from None
        except IsADirectoryError:
            raise BundleError(f"{f}: a directory, not a file (listed in {MANIFEST})") from None
        if len(data) != meta["bytes"]:
            raise BundleError(f"{f}: size {len(data)} bytes, manifest says {meta['bytes']} (truncated or replaced)")
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta["sha256"]:
            raise BundleError(f"{f}: sha256 {digest[:16]}... does not match the manifest's {meta['sha256'][:16]}...")
        return data if name.endswith(GRAPH_SUFFIXES) else None

    def verify_files(self) -> None:
        """Wait for (or run) the check of every file the manifest lists; raise the first failure."""
        if not self._pending:
            self._start_verification()
        for name in self.manifest["files"]:
            self._pending[name].result()

    def verified_bytes(self, name: str) -> bytes:
        """A graph file's bytes, checked against the manifest: what a session is created from, so
        that what runs is what was hashed (read once, no window between the check and the load)."""
        if name not in self.manifest["files"]:
            raise BundleError(f"{self.path / name}: not listed in {MANIFEST}, so it cannot be verified")
        pending = self._pending.pop(name, None)
        data = pending.result() if pending is not None else None
        if data is None:
            data = self._read_verified(name)
        assert data is not None
        self._pending[name] = _done(None)
        return data

    def file(self, key: str) -> Path:
        return self.path / self.manifest["graphs"][key]["file"]

    @property
    def chunk(self) -> int:
        return int(self.manifest["graphs"]["score"]["chunk"])

    @property
    def advance_chunk(self) -> int:
        """Time steps per call of the advance graph (reading prompts); 0 for a bundle without one."""
        advance = self.manifest["graphs"].get("advance")
        return int(advance["chunk"]) if advance else 0

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab"]["size"])

    def read_vocab(self) -> Vocabulary:
        """The vocabulary (read and checked by the one reader, :meth:`Vocabulary.load`), refused
        unless its size and special tokens are where the manifest says."""
        path = self.path / self.manifest["vocab"]["file"]
        try:
            vocab = Vocabulary.load(path)
        except RnnlmError as e:
            raise BundleError(e.message) from None
        if len(vocab) != self.vocab_size:
            raise BundleError(f"{path}: {len(vocab)} tokens, but the manifest says {self.vocab_size}")
        for special in ("unk", "eos"):
            idx, tok = self.manifest["vocab"][f"{special}_id"], self.manifest["vocab"][special]
            if vocab.stoi[tok] != idx:
                raise BundleError(f"{path}: {tok} is not at line {idx + 1} as the manifest says")
        return vocab

    def text_spec(self) -> TextSpec:
        """How this model reads text, as it was trained (the manifest's ``text`` entry)."""
        try:
            return TextSpec.from_json(self.manifest["text"])
        except (KeyError, TypeError) as e:
            raise BundleError(f"{self.path / MANIFEST}: the text entry is incomplete ({e})") from None
        except RnnlmError as e:
            raise BundleError(f"{self.path / MANIFEST}: {e.message}") from None


def _done(value: bytes | None) -> Future[bytes | None]:
    f: Future[bytes | None] = Future()
    f.set_result(value)
    return f
