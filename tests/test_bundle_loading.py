"""Loading refuses a damaged bundle with one message that names the file and what is wrong, and finds
a bundle inside a model directory. Each test damages its own copy of the session's LSTM bundle
(``conftest.py``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from bundles import TOKENS, read_manifest, rehash, write_manifest
from rnnlm.serve import BundleError, LanguageModel

from rnnlm.errors import RnnlmError


def _flip_byte(b: Path) -> None:
    data = bytearray((b / "score.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / "score.onnx").write_bytes(bytes(data))


def _truncate(b: Path) -> None:
    (b / "score.onnx").write_bytes((b / "score.onnx").read_bytes()[:1000])


def _truncate_rehashed(b: Path) -> None:
    _truncate(b)
    rehash(b, "score.onnx")


def _delete_step(b: Path) -> None:
    (b / "step.onnx").unlink()


def _vocab_line_removed(b: Path) -> None:
    lines = (b / "vocab.txt").read_text(encoding="utf-8").splitlines()
    (b / "vocab.txt").write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")  # drop "the"
    rehash(b, "vocab.txt")


def _vocab_and_size(b: Path) -> None:
    _vocab_line_removed(b)
    m = read_manifest(b)
    m["vocab"]["size"] -= 1
    write_manifest(b, m)


def _vocab_size_and_ids(b: Path) -> None:
    _vocab_and_size(b)
    m = read_manifest(b)
    m["vocab"]["unk_id"] -= 1
    m["vocab"]["eos_id"] -= 1
    write_manifest(b, m)


def _manifest(edit):  # type: ignore[no-untyped-def]
    def apply(b: Path) -> None:
        m = read_manifest(b)
        edit(m)
        write_manifest(b, m)

    return apply


def _probe_edit(m: dict) -> None:
    m["probe"]["target_logprobs"][2] += 1.0


def _rename_input(m: dict) -> None:
    m["graphs"]["step"]["inputs"][0]["name"] = "tokens"


# name -> (damage, words the message must hold)
DAMAGE = {
    "flipped-byte": (_flip_byte, ["score.onnx", "sha256", "does not match"]),
    "truncated": (_truncate, ["score.onnx", "size 1000 bytes", "truncated"]),
    "truncated-rehashed": (_truncate_rehashed, ["score.onnx", "onnxruntime cannot load it"]),
    "missing-file": (_delete_step, ["step.onnx", "missing"]),
    "vocab-line-removed": (_vocab_line_removed, ["vocab.txt", f"{len(TOKENS) - 1} tokens", f"says {len(TOKENS)}"]),
    "vocab-special-moved": (_vocab_and_size, ["vocab.txt", "<unk> is not at line"]),
    "vocab-vs-logits": (_vocab_size_and_ids, ["vocab.txt", f"the model predicts {len(TOKENS)}"]),
    "format-version": (_manifest(lambda m: m.update(format_version=2)), ["manifest.json", "format version 2"]),
    "not-a-bundle": (_manifest(lambda m: m.update(format="other")), ["manifest.json", "not an rnnlm bundle"]),
    "no-probe": (_manifest(lambda m: m.pop("probe")), ["manifest.json", "'probe'"]),
    "probe-tampered": (_manifest(_probe_edit), ["probe", "differ from the manifest's by 1.00e+00"]),
    "graph-names": (_manifest(_rename_input), ["step.onnx", "do not match the manifest"]),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_loading_refuses_a_damaged_bundle(lstm_bundle: Path, tmp_path: Path, case: str) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(lstm_bundle, copy)
    damage, words = DAMAGE[case]
    damage(copy)
    with pytest.raises(BundleError) as info:
        LanguageModel.load(copy, threads=1)
    assert isinstance(info.value, RnnlmError)
    for w in words:
        assert w in info.value.message, info.value.message
    LanguageModel.load(lstm_bundle, threads=1)  # the shared original is intact


def test_loading_finds_a_bundle_inside_a_model_dir(lstm_bundle: Path, tmp_path: Path) -> None:
    shutil.copytree(lstm_bundle, tmp_path / "model" / "onnx")
    assert LanguageModel.load(tmp_path / "model", threads=1).bundle.path == tmp_path / "model" / "onnx"
    for missing in (tmp_path / "nowhere", tmp_path / "model" / "onnx" / "vocab.txt"):
        with pytest.raises(BundleError):
            LanguageModel.load(missing)
