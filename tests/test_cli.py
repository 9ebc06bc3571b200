"""The command line: help that teaches, --json for machines, one clear line and exit 2 on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rnnlm.cli import app

runner = CliRunner()
REAL_PTB = Path(os.environ.get("RNNLM_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared/data/ptb")


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def assert_clean_error(code: int, out: str, err: str, *words: str) -> None:
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_no_arguments_shows_help() -> None:
    result = runner.invoke(app, [])
    assert "train" in result.output and "score" in result.output and "generate" in result.output


@pytest.mark.parametrize("command", ["info", "data", "train", "eval", "export", "score", "rescore", "generate", "serve"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    code, out, _ = invoke(command, "--help")
    assert code == 0
    assert "Example" in out or "Examples" in out


def test_info_reports_the_paper_parameter_counts() -> None:
    counts = {}
    for preset in ("rhn-paper", "hypernets-char-paper", "hypernets-char-paper-ln"):
        code, out, _ = invoke("info", "--preset", preset, "--json")
        assert code == 0
        counts[preset] = json.loads(out)["parameters"]
    assert 23.0e6 <= counts["rhn-paper"] <= 24.0e6
    assert abs(counts["hypernets-char-paper"] / 4.91e6 - 1) <= 0.05
    assert abs(counts["hypernets-char-paper-ln"] / 4.92e6 - 1) <= 0.05
    assert counts["hypernets-char-paper-ln"] > counts["hypernets-char-paper"]


def test_info_applies_overrides() -> None:
    code, out, _ = invoke("info", "--cell", "lstm", "--set", "hidden_size=128", "--set", "emb_size=128", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["model"]["hidden_size"] == 128 and data["preset"] == "lstm-small"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("info", "--cell", "gru"), ("unknown cell", "gru")),
        (("info", "--preset", "nope"), ("unknown preset", "nope")),
        (("info", "--cell", "lstm", "--preset", "rhn-paper"), ("rhn-paper", "lstm")),
        (("info", "--cell", "lstm", "--set", "colour=red"), ("unknown key", "colour")),
        (("info", "--cell", "lstm", "--set", "hidden_size=big"), ("hidden_size",)),
        (("train", "--cell", "gru", "--dry-run"), ("unknown cell",)),
        (("train", "--cell", "lstm", "--dry-run", "--set", "colour=red"), ("colour",)),
        (("train", "--cell", "lstm", "--data-dir", "/nonexistent/ptb", "--dry-run"), ("/nonexistent/ptb", "--data-dir")),
        (("train", "--cell", "lstm", "--time-budget", "0", "--dry-run"), ("--time-budget",)),
        (("train", "--cell", "lstm", "--time-budget", "-3", "--dry-run"), ("--time-budget",)),
        (("eval", "/nonexistent/model"), ("/nonexistent/model",)),
        (("export", "--cell", "gru"), ("unknown cell",)),
    ],
)
def test_bad_input_gets_one_clear_line_and_exit_2(args: tuple[str, ...], words: tuple[str, ...]) -> None:
    assert_clean_error(*invoke(*args), *words)


def _write_corpus(directory: Path, texts: dict[str, str], manifest: bool = True) -> None:
    import hashlib

    directory.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (directory / name).write_text(text)
    if manifest:
        (directory / "SHA256SUMS").write_text(
            "".join(f"{hashlib.sha256((directory / n).read_bytes()).hexdigest()}  {n}\n" for n in texts))


def test_empty_and_corrupted_data_files_are_refused(tmp_path: Path) -> None:
    good = {f"ptb.{s}.txt": "a b c\n" * 50 for s in ("train", "valid", "test")}
    _write_corpus(tmp_path / "ok", good)
    corrupt = tmp_path / "corrupt"
    _write_corpus(corrupt, good)
    (corrupt / "ptb.valid.txt").write_text("a b c\n" * 49)  # truncated after the manifest was made
    assert_clean_error(*invoke("train", "--cell", "lstm", "--data-dir", str(corrupt), "--dry-run"), "ptb.valid.txt")
    empty = tmp_path / "empty"
    _write_corpus(empty, {**good, "ptb.test.txt": ""})
    assert_clean_error(*invoke("train", "--cell", "lstm", "--data-dir", str(empty), "--dry-run"), "ptb.test.txt", "empty")
    # The canonical checksums apply where a directory has no manifest of its own.
    canonical = tmp_path / "canonical"
    _write_corpus(canonical, good, manifest=False)
    assert_clean_error(*invoke("data", "--data-dir", str(canonical)), "ptb.")


def test_dry_run_writes_nothing_outside_a_temporary_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    _write_corpus(data, {f"ptb.{s}.txt": "the cat sat on the mat\n" * 300 for s in ("train", "valid", "test")})
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = invoke("train", "--cell", "rhn", "--data-dir", str(data), "--dry-run", "--device", "cpu",
                            "--set", "hidden_size=16", "--set", "emb_size=16", "--json")
    assert code == 0, err
    assert json.loads(out)["steps"] == 5
    assert list(work.iterdir()) == []


@pytest.mark.skipif(not (REAL_PTB / "ptb.train.txt").exists(), reason="Penn Treebank not at ../shared/data/ptb or $RNNLM_DATA_DIR")
def test_data_command_reports_the_real_counts() -> None:
    code, out, _ = invoke("data", "--data-dir", str(REAL_PTB), "--json")
    assert code == 0
    data = json.loads(out)
    assert (data["train"], data["valid"], data["test"], data["vocab"]) == (929_589, 73_760, 82_430, 10_000)


def test_console_script_runs_without_a_traceback(tmp_path: Path) -> None:
    """The installed entry point, in a real process, for one refusal and one success."""
    exe = Path(sys.executable).with_name("rnnlm")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rnnlm"]
    bad = subprocess.run([*cmd, "info", "--cell", "gru"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
    ok = subprocess.run([*cmd, "info", "--cell", "rhn", "--json"], capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["model"]["cell"] == "rhn"


def test_quick_commands_end_their_process_with_every_line_written(lstm_bundle: Path, tmp_path: Path) -> None:
    """score, generate and rescore end with os._exit once their output is flushed (cli.QUICK_EXIT): a
    real process's stdout holds every line, a refusal is still one line and its code."""
    text = tmp_path / "text.txt"
    lines = ["the stock market fell", "a new bank", "shares rose"] * 300
    text.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "rnnlm"]
    ok = subprocess.run([*cmd, "score", str(text), "--model", str(lstm_bundle), "--per-line", "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    rows = [json.loads(line) for line in ok.stdout.splitlines()]
    assert len(rows) == len(lines) + 1 and rows[-1]["total"] and rows[-1]["tokens"] == sum(r["tokens"] for r in rows[:-1])
    gen = subprocess.run([*cmd, "generate", "--model", str(lstm_bundle), "--prompt", "the stock", "--max-tokens", "5",
                          "--seed", "3", "--json"], capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    from rnnlm.serve import LanguageModel
    want = LanguageModel.load(lstm_bundle).generate("the stock", max_new_tokens=5, seed=3)
    assert json.loads(gen.stdout)["samples"] == want
    bad = subprocess.run([*cmd, "score", str(tmp_path / "missing.txt"), "--model", str(lstm_bundle)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ")


def test_export_with_triton_writes_a_repository_beside_the_bundle(built: Any, tmp_path: Path) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    ckpt = built("lstm", False).checkpoint
    code, out, err = invoke("export", str(ckpt), "--out", str(tmp_path / "bundle"), "--triton", str(tmp_path / "triton"),
                            "--json")
    assert code == 0, err
    summary = json.loads(out)
    repo = Path(summary["triton"])
    assert repo.parent == tmp_path / "triton" and (repo / "1" / "model.onnx").is_file()
    config = text_format.Parse((repo / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert config.backend == "onnxruntime"
    assert [s.input_name for s in config.sequence_batching.state] == [s["input"] for s in manifest["state"]]

    # A second export into a directory the user filled with something else is refused, cleanly.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, out, err = invoke("export", str(ckpt), "--out", str(tmp_path / "bundle2"), "--triton", str(tmp_path / "mine"))
    assert_clean_error(code, out, err)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
