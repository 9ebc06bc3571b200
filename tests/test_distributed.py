"""Data-parallel training: two CPU ranks (gloo, started by torchrun) against one process over the
union of their streams, computed here independently.

One torchrun launch runs every scenario of WORKER on both ranks (starting processes is the slow
part on two cores); the tests below read what each rank recorded. Rank 1 runs under an audit hook
that records every file system event naming the runs directory, so "only rank 0 writes" is observed,
not assumed; rank 0 runs under the same hook as the positive control.

The scenario where only rank 1 sees an infinite loss used to hang (3 runs in 11): the error left
DDP's Reducer as the last owner of the gloo group, and freeing it joined gloo's worker threads with
the GIL held while one of them needed the GIL (rnnlm/distributed.py explains). The "stuck" scenario
shows the collective timeout: rank 1 stalls, rank 0 gives up after the timeout naming itself, and
rank 1 then finds rank 0 gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train import TINY, tiny_corpus

from rnnlm.checkpoint import TRAIN_CONFIG, load_model_dir, read_config
from rnnlm.data import batchify
from rnnlm.distributed import World, detect
from rnnlm.errors import RnnlmError
from rnnlm.model import LanguageModel
from rnnlm.train import train

torch.set_num_threads(1)
NO_DROPOUT = ["dropout_emb=0", "dropout_input=0", "dropout_recurrent=0", "dropout_output=0", "recurrent_dropout=0"]
LR = 0.5
SGD = [*TINY, *NO_DROPOUT, "optimizer=sgd", f"lr={LR}", "epochs=1"]  # + the clip chosen by the `ddp` fixture
DROPOUT = [*TINY, "epochs=1"]  # the presets' dropout: masks differ per rank, resume must restore each rank's RNG
ATOL = 2e-6  # float32, summed in another order by two ranks
STUCK_TIMEOUT_S, STUCK_SLEEP_S = 8, 20  # the "stuck" scenario: the collective timeout, rank 1's stall

WORKER = r"""
import json, os, shutil, signal, sys, time, types
from pathlib import Path

spec = json.loads(Path(sys.argv[1]).read_text())
sys.path.insert(0, spec["tests"])
import torch
import torch.nn.functional as F
from test_distributed import DROPOUT, SGD
from test_train import TINY, tiny_corpus

import rnnlm.trainer
from rnnlm.errors import RnnlmError
from rnnlm.train import train

torch.set_num_threads(1)
rank = int(os.environ["RANK"])
runs, sgd = spec["runs"], [*SGD, f"clip={spec['clip']}"]
events = []

def audit(event, args):
    for a in args:
        if isinstance(a, (str, bytes, os.PathLike)) and os.fsdecode(a).startswith(runs):
            events.append([event, os.fsdecode(a)])

sys.addaudithook(audit)
corpus, record = tiny_corpus(), {}

def run(name, **kw):
    # A fresh TCPStore per call: after destroy_process_group a new group reuses the old group's key names,
    # and in torchrun's long-lived agent store it could read the old group's stale addresses.
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    os.environ["MASTER_PORT"] = str(spec["ports"].pop())
    try:
        r = train(corpus=corpus, device="cpu", quiet=True, **kw)
        record[name] = {"steps": r.steps, "losses": r.step_losses, "signal": r.interrupted_by, "best": r.best_valid_ppl,
                        "rank": r.rank, "world_size": r.world_size}
    except RnnlmError as e:
        record[name] = {"error": e.message, "code": e.code}
    print(f"rank {rank}: {name} done", flush=True)  # where a hang happened, if one does

run("batch3", cell="lstm", out=f"{runs}/batch3", overrides=[*TINY, "batch_size=3"])
run("sgd-1", cell="lstm", out=f"{runs}/sgd", overrides=sgd, max_steps=1)
if rank == 0:
    shutil.copy(f"{runs}/sgd/train_state.pt", f"{spec['results']}/sgd-step1.pt")
run("sgd-4", cell="lstm", out=f"{runs}/sgd", overrides=sgd, max_steps=4, resume=True)

def interrupt(step):  # rank 0 alone is signalled: rank 1 must stop at the same step, or hang
    if rank == 0 and step == 3:
        os.kill(os.getpid(), signal.SIGINT)

run("full", cell="hypernets", out=f"{runs}/full", overrides=DROPOUT, max_steps=8)
run("cut", cell="hypernets", out=f"{runs}/cut", overrides=DROPOUT, max_steps=8, on_step=interrupt)
run("resumed", cell="hypernets", out=f"{runs}/cut", overrides=DROPOUT, max_steps=8, resume=True)

real_ce, calls = F.cross_entropy, [0]
def inf_loss_on_rank1(*a, **kw):  # the loss is infinite, the gradient finite: only rank 1 can see it
    calls[0] += 1
    return real_ce(*a, **kw) + (float("inf") if calls[0] == 3 else 0.0)
if rank == 1:
    rnnlm.trainer.F = types.SimpleNamespace(cross_entropy=inf_loss_on_rank1)
run("inf", cell="lstm", out=f"{runs}/inf", overrides=TINY)
rnnlm.trainer.F = F

real_clock = time.monotonic  # rank 1's clock runs 1000 times fast: if it counted, rank 1 would stop at step 1
if rank == 1:
    rnnlm.trainer.time = types.SimpleNamespace(monotonic=lambda: 1000 * real_clock())
run("budget", cell="lstm", out=f"{runs}/budget", overrides=[*TINY, "epochs=100000"], time_budget=0.02)
rnnlm.trainer.time = time

run("ws-refused", cell="lstm", out=f"{runs}/from-single", overrides=sgd, max_steps=4, resume=True)
run("ws-forced", cell="lstm", out=f"{runs}/from-single", overrides=sgd, max_steps=4, resume=True, force=True)

os.environ["RNNLM_COLLECTIVE_TIMEOUT"] = str(spec["stuck_timeout"])
stepped = []
def stall(step):  # rank 1 stops answering after step 2: rank 0 must give up after the timeout, not wait
    stepped.append(time.monotonic())
    if rank == 1 and step == 2:
        time.sleep(spec["stuck_sleep"])
run("stuck", cell="lstm", out=f"{runs}/stuck", overrides=TINY, on_step=stall)
record["stuck"]["waited_s"] = time.monotonic() - stepped[-1]  # from this rank's last step to its error
del os.environ["RNNLM_COLLECTIVE_TIMEOUT"]

from typer.testing import CliRunner
from rnnlm.cli import app
for name in ("cli", "cli-again"):  # the second finds the first's run in --out: one error line, on rank 0
    os.environ["MASTER_PORT"] = str(spec["ports"].pop())
    cli = CliRunner().invoke(app, ["train", "--cell", "lstm", "--data-dir", spec["data"], "--out", f"{runs}/cli",
                                   "--device", "cpu", "--max-steps", "3", *[a for kv in TINY for a in ("--set", kv)]])
    record[name] = {"exit_code": cli.exit_code, "output": cli.output}
record["events"] = events
Path(spec["results"], f"rank{rank}.json").write_text(json.dumps(record))
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:  # all bound at once: n different ports
        s.bind(("127.0.0.1", 0))
    ports = [int(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


def _gradient(model: LanguageModel, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """d(mean token loss)/d(parameters) of one window from a zero state."""
    model.zero_grad()
    logits, _ = model(x, model.init_state(x.shape[1]))
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
    return [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]


def _norm(g: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g])))


def _clipped(g: list[torch.Tensor], clip: float) -> list[torch.Tensor]:
    scale = min(1.0, clip / (_norm(g) + 1e-6))  # what clip_grad_norm_ does
    return [t * scale for t in g]


def _write_ptb(data: Path) -> None:
    data.mkdir()
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    for split, lines in (("train", 200), ("valid", 20), ("test", 20)):
        (data / f"ptb.{split}.txt").write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(lines)) + "\n")
    (data / "SHA256SUMS").write_text("".join(f"{hashlib.sha256((data / f'ptb.{s}.txt').read_bytes()).hexdigest()}  "
                                             f"ptb.{s}.txt\n" for s in ("train", "valid", "test")))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return launch(tmp_path_factory.mktemp("ddp"))


def launch(root: Path, timeout_s: float = 240) -> dict[str, Any]:
    """The single-process references, then WORKER on two ranks; what the tests compare."""
    runs, results = root / "runs", root / "results"
    runs.mkdir()
    results.mkdir()
    _write_ptb(root / "data")

    # The first window's gradient over all 4 streams, and over each rank's 2, from the initial weights.
    corpus = tiny_corpus()
    probe = train(cell="lstm", corpus=corpus, out=root / "probe", overrides=[*SGD, "clip=1"], device="cpu",
                  quiet=True, max_steps=1)
    cfg = read_config(probe.out)
    seed = json.loads((probe.out / TRAIN_CONFIG).read_text())["seed"]
    torch.manual_seed(seed)
    model = LanguageModel(cfg)
    p0 = [p.detach().clone() for p in model.parameters()]
    data = torch.from_numpy(batchify(corpus.train, 4))  # (N, 4)
    x, y = data[:6], data[1:7]  # bptt 6
    g = _gradient(model, x, y)
    g_rank = [_gradient(model, x[:, 2 * r : 2 * r + 2], y[:, 2 * r : 2 * r + 2]) for r in range(2)]
    # A clip that the average gradient stays under but a rank's own gradient exceeds: clipping each
    # rank before averaging, or summing instead of averaging, would then give another step.
    clip = (_norm(g) + max(_norm(gr) for gr in g_rank)) / 2
    assert _norm(g) < clip < max(_norm(gr) for gr in g_rank) and 2 * _norm(g) > clip

    sgd = [*SGD, f"clip={clip}"]
    ref4 = train(cell="lstm", corpus=corpus, out=root / "ref4", overrides=sgd, device="cpu", quiet=True, max_steps=4)
    train(cell="lstm", corpus=corpus, out=runs / "from-single", overrides=sgd, device="cpu", quiet=True, max_steps=2)

    spec = root / "spec.json"
    spec.write_text(json.dumps({"tests": str(Path(__file__).parent), "runs": str(runs), "results": str(results),
                                "clip": clip, "data": str(root / "data"), "ports": _free_ports(14),
                                "stuck_timeout": STUCK_TIMEOUT_S, "stuck_sleep": STUCK_SLEEP_S}))
    (root / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_ports(1)[0]), str(root / "worker.py"), str(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:  # a rank left in a collective: torchrun passes SIGTERM on, then kills
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        (root / "torchrun.log").write_text(out)
        pytest.fail(f"the two ranks hung:\n{out[:6000]}")
    (root / "torchrun.log").write_text(out)
    assert proc.returncode == 0, out[-3000:]
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    expected = [a - LR * b for a, b in zip(p0, _clipped(g, clip), strict=True)]
    wrong = {"clipped per rank": [a - LR * (b + c) / 2 for a, b, c in
                                  zip(p0, *[_clipped(gr, clip) for gr in g_rank], strict=True)],
             "summed": [a - LR * b for a, b in zip(p0, _clipped([2 * t for t in g], clip), strict=True)]}
    names = [n for n, _ in model.named_parameters()]
    return {"root": root, "runs": runs, "results": results, "ranks": ranks, "ref4": ref4, "names": names,
            "expected": expected, "wrong": wrong}


def _state(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((s - t).abs().max()) for s, t in zip(a, b, strict=True))


def test_one_step_is_the_single_process_step_over_all_streams(ddp: dict[str, Any]) -> None:
    weights = _state(ddp["results"] / "sgd-step1.pt")["model"]
    got = [weights[n] for n in ddp["names"]]
    assert _max_diff(got, ddp["expected"]) < ATOL
    for what, w in ddp["wrong"].items():  # the check can tell the right step from plausible wrong ones
        assert _max_diff(got, w) > 100 * ATOL, what


def test_four_steps_equal_one_process(ddp: dict[str, Any]) -> None:
    r0, r1 = ddp["ranks"]
    losses = r0["sgd-1"]["losses"] + r0["sgd-4"]["losses"]
    assert losses == r1["sgd-1"]["losses"] + r1["sgd-4"]["losses"]  # all-reduced: the same on every rank
    assert losses == pytest.approx(ddp["ref4"].step_losses, rel=1e-5)
    assert r0["sgd-4"]["best"] == pytest.approx(ddp["ref4"].best_valid_ppl, rel=1e-5)
    got, ref = _state(ddp["runs"] / "sgd" / "train_state.pt"), _state(ddp["ref4"].out / "train_state.pt")
    assert got["step"] == ref["step"] == 4 and got["tokens_seen"] == ref["tokens_seen"]
    for name, t in ref["model"].items():
        assert torch.allclose(got["model"][name], t, atol=10 * ATOL), name
    # The carried state of all 4 streams, rank 0's two then rank 1's: the single process's, in its order.
    for layer, ref_layer in zip(got["carry"], ref["carry"], strict=True):
        for t, u in zip(layer, ref_layer, strict=True):
            assert t.shape == u.shape == (4, 16) and torch.allclose(t, u, atol=10 * ATOL)
    assert (r0["sgd-4"]["rank"], r1["sgd-4"]["rank"], r1["sgd-4"]["world_size"]) == (0, 1, 2)


def test_only_rank_0_touches_the_output_directory(ddp: dict[str, Any]) -> None:
    r0, r1 = ddp["ranks"]
    assert r1["events"] == []
    written = {Path(path).name for event, path in r0["events"] if event == "os.rename"}  # atomic writes end in a rename
    assert {"model.safetensors", "train_state.pt", "metrics.jsonl", "curves.png", "config.json"} <= written
    assert {p.name for p in (ddp["runs"] / "sgd").iterdir()} == {p.name for p in ddp["ref4"].out.iterdir()}


def test_a_signal_to_one_rank_stops_both_and_resume_is_exact(ddp: dict[str, Any]) -> None:
    for r in ddp["ranks"]:
        assert r["cut"]["signal"] == signal.SIGINT and r["cut"]["steps"] == 3
        assert r["cut"]["losses"] + r["resumed"]["losses"] == r["full"]["losses"]  # exactly: RNG and carry per rank
    full, cut = _state(ddp["runs"] / "full" / "train_state.pt"), _state(ddp["runs"] / "cut" / "train_state.pt")
    assert full["world_size"] == 2 and len(full["rng_cpu_ranks"]) == 2
    assert not torch.equal(full["rng_cpu_ranks"][0], full["rng_cpu_ranks"][1])  # each rank its own dropout
    for name, t in full["model"].items():
        assert torch.equal(cut["model"][name], t), name
    a, _ = load_model_dir(ddp["runs"] / "full")  # the best weights, as written by rank 0
    b, _ = load_model_dir(ddp["runs"] / "cut")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_a_loss_only_one_rank_sees_as_infinite_stops_both(ddp: dict[str, Any]) -> None:
    for r in ddp["ranks"]:
        assert r["inf"]["code"] == 3 and "diverged at step 3: the loss is not finite" in r["inf"]["error"]


def test_a_rank_stuck_in_a_collective_fails_both_with_a_message_naming_the_rank(ddp: dict[str, Any]) -> None:
    for rank, r in enumerate(ddp["ranks"]):
        stuck = r["stuck"]
        assert stuck["code"] == 1 and stuck["error"].startswith(f"rank {rank} of 2: "), stuck
        assert "RNNLM_COLLECTIVE_TIMEOUT" in stuck["error"]
    # Rank 0 gave up after the timeout, long before rank 1 woke up; rank 1 then found rank 0 gone.
    assert STUCK_TIMEOUT_S - 1 < ddp["ranks"][0]["stuck"]["waited_s"] < STUCK_SLEEP_S - 2
    assert ddp["ranks"][1]["stuck"]["waited_s"] > STUCK_SLEEP_S


def test_the_time_budget_is_read_from_rank_0s_clock(ddp: dict[str, Any]) -> None:
    r0, r1 = ddp["ranks"]
    assert r0["budget"]["steps"] == r1["budget"]["steps"] > 5  # rank 1's fast clock alone would stop at step 1


def test_world_size_and_batch_refusals(ddp: dict[str, Any]) -> None:
    for r in ddp["ranks"]:
        assert "does not split evenly over 2 processes" in r["batch3"]["error"]
        assert r["ws-refused"]["code"] == 2
        assert "trained by 1 process and this run has 2" in r["ws-refused"]["error"]
        # --force: the single process's 2 steps + 2 data-parallel ones = the single process's 4.
        assert r["ws-forced"]["steps"] == 4
    single, ref = _state(ddp["runs"] / "from-single" / "train_state.pt"), _state(ddp["ref4"].out / "train_state.pt")
    for name, t in ref["model"].items():
        assert torch.allclose(single["model"][name], t, atol=10 * ATOL), name
    assert not (ddp["runs"] / "batch3").exists()


def test_the_cli_under_torchrun_reports_on_rank_0_only(ddp: dict[str, Any]) -> None:
    r0, r1 = ddp["ranks"]
    assert r0["cli"]["exit_code"] == r1["cli"]["exit_code"] == 0, r0["cli"]["output"] + r1["cli"]["output"]
    assert "step 3  train ppl" in r0["cli"]["output"]
    assert "epoch" not in r1["cli"]["output"]
    assert (ddp["runs"] / "cli" / "model.safetensors").is_file()


def test_an_output_collision_is_one_line_on_rank_0_and_exit_2_everywhere(ddp: dict[str, Any]) -> None:
    r0, r1 = (r["cli-again"] for r in ddp["ranks"])
    assert r0["exit_code"] == r1["exit_code"] == 2
    lines = r0["output"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "already holds a training run" in lines[0], lines
    assert r1["output"] == ""


def test_detect_reads_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert detect() == World() and detect(False) == World()
    with pytest.raises(RnnlmError, match="needs torchrun"):
        detect(True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert detect() == World()  # torchrun --nproc-per-node 1 is a plain run
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RnnlmError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT unset"):
        detect()
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert detect() == World(rank=1, size=2, local_rank=1)
    with pytest.raises(RnnlmError, match="overwrite the same checkpoint"):
        detect(False)
