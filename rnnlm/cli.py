"""The ``rnnlm`` command line. Each command imports its stage lazily and calls one plain function
that the Python API exposes too; errors become one line on stderr and a non-zero exit code."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from rnnlm.errors import RnnlmError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Recurrent language models (HyperLSTM, RHN, LSTM) on Penn Treebank: train with PyTorch, "
    "export to ONNX, score and generate with onnxruntime.",
)

T = TypeVar("T")

CellOpt = Annotated[str | None, typer.Option("--cell", help="lstm, rhn or hypernets.")]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="A named config (see `rnnlm info`); default: the cell's small CPU preset.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for machines instead of text.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: --set hidden_size=512 (repeatable).")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Directory with ptb.*.txt; else $RNNLM_DATA_DIR, the cache, or a download.")]


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def run(fn: Callable[[], T]) -> T:
    """Call a stage; turn RnnlmError into one clear line and its exit code."""
    try:
        return fn()
    except RnnlmError as e:
        raise fail(e.message, e.code) from None
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None
    except MemoryError:
        raise fail("out of memory", 1) from None


def emit(data: dict[str, Any], as_json: bool, text: str) -> None:
    typer.echo(json.dumps(data) if as_json else text)


@app.command()
def info(cell: CellOpt = None, preset: PresetOpt = None, overrides: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Show a resolved model config and its parameter count; without options, list the presets.

    Example: rnnlm info --cell rhn --preset rhn-paper --json
    """

    def body() -> None:
        import dataclasses

        from rnnlm.config import PRESETS, apply_overrides, resolve

        if cell is None and preset is None and not overrides:
            rows = {name: {"cell": p.model.cell, "description": p.description} for name, p in PRESETS.items()}
            emit({"presets": rows}, as_json, "\n".join(f"{n:26s} {r['cell']:10s} {r['description']}" for n, r in rows.items()))
            return
        p = resolve(cell, preset)
        model_cfg, train_cfg = apply_overrides(p.model, p.train, overrides or [])
        from rnnlm.model import LanguageModel

        n = LanguageModel(model_cfg).num_parameters()
        model_d, train_d = dataclasses.asdict(model_cfg), dataclasses.asdict(train_cfg)
        data = {"preset": p.name, "parameters": n, "model": model_d, "train": train_d}
        lines = [f"preset {p.name}: {p.description}", f"parameters: {n:,} ({n / 1e6:.2f}M)", "model:"]
        lines += [f"  {k} = {v}" for k, v in model_d.items()] + ["train:"]
        lines += [f"  {k} = {v}" for k, v in train_d.items()]
        emit(data, as_json, "\n".join(lines))

    run(body)


@app.command()
def data(
    data_dir: DataDirOpt = None,
    level: Annotated[str, typer.Option(help="word or char.")] = "word",
    path: Annotated[bool, typer.Option("--path", help="Print only the data directory (for scripts).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Find (or download once, verify and cache) Penn Treebank and show its token counts.

    Example: rnnlm score "$(rnnlm data --path)/ptb.test.txt"
    """

    def body() -> dict[str, Any]:
        from rnnlm.data import load_ptb, locate_ptb

        directory = locate_ptb(data_dir, level=level)
        if path:
            return {"path": str(directory)}
        corpus = load_ptb(directory, level=level)
        return {"path": str(directory), "level": level, "vocab": len(corpus.vocab),
                **{split: len(corpus.split(split)) for split in ("train", "valid", "test")}}

    info_ = run(body)
    if path and not as_json:
        typer.echo(info_["path"])
        return
    emit(info_, as_json, f"{info_['path']} ({level} level): train {info_['train']:,}  valid {info_['valid']:,}  "
         f"test {info_['test']:,} tokens; vocabulary {info_['vocab']:,}")


@app.command()
def train(
    cell: CellOpt = None,
    preset: PresetOpt = None,
    level: Annotated[str | None, typer.Option(help="word or char (default: the preset's).")] = None,
    data_dir: DataDirOpt = None,
    out: Annotated[Path | None, typer.Option(help="Checkpoint directory (default: models/<cell>).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum number of epochs.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    time_budget: Annotated[float | None, typer.Option(help="Stop after this many minutes, validation included.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: the preset's).")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when torch sees one), cpu or cuda.")] = "auto",
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its train_state.pt.")] = False,
    force: Annotated[bool, typer.Option(help="Start over in a used --out, or resume despite a changed config.")] = False,
    overrides: SetOpt = None,
    dry_run: Annotated[bool, typer.Option(help="A few steps on a slice of the data, in a temporary directory.")] = False,
    tensorboard: Annotated[bool | None, typer.Option("--tensorboard/--no-tensorboard", help="TensorBoard summaries in "
                                                     "<out>/tensorboard (default: when tensorboard is installed).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a language model on Penn Treebank and write a checkpoint directory.

    Example: rnnlm train --cell rhn --time-budget 20 --data-dir ../shared/data/ptb

    Ctrl-C (or SIGTERM) finishes the step, saves, and exits 130 (143); --resume continues exactly.

    Data-parallel: torchrun --nproc-per-node 2 -m rnnlm train --cell lstm --device cpu   (gloo; NCCL
    on CUDA). Each process trains a share of the batch's streams; rank 0 alone writes.
    """
    from rnnlm.train import train as train_fn

    result = run(lambda: train_fn(cell=cell, preset=preset, level=level, data_dir=data_dir, out=out, epochs=epochs,
                                  max_steps=max_steps, time_budget=time_budget, seed=seed, device=device, resume=resume,
                                  force=force, overrides=overrides, dry_run=dry_run, tensorboard=tensorboard))
    data = {"out": str(result.out), "epochs": result.epochs_done, "steps": result.steps,
            "best_valid_ppl": result.best_valid_ppl, "interrupted": result.interrupted_by is not None,
            "world_size": result.world_size}
    if result.rank == 0:  # under torchrun, one summary, not one per process
        emit(data, as_json, f"best valid ppl {result.best_valid_ppl:.2f} after {result.steps} steps"
             + ("" if dry_run else f"; checkpoint in {result.out}")
             + (f" ({result.world_size} processes)" if result.world_size > 1 else ""))
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@app.command("eval")
def eval_cmd(
    model_dir: Annotated[Path | None, typer.Argument(help="Checkpoint directory (default: models/<cell>).")] = None,
    cell: CellOpt = None,
    split: Annotated[str, typer.Option(help="valid or test (or train).")] = "valid",
    batch_size: Annotated[int, typer.Option(help="1 is exact: one stream, the state carried through the split.")] = 1,
    data_dir: DataDirOpt = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a checkpoint exactly: tokens, total NLL in nats, perplexity (and bpc at char level).

    Example: rnnlm eval models/rhn --split test --json
    """

    def body() -> dict[str, Any]:
        from rnnlm.checkpoint import load_model_dir
        from rnnlm.data import load_ptb
        from rnnlm.evaluate import evaluate
        from rnnlm.train import pick_device

        if split not in ("train", "valid", "test"):
            raise RnnlmError(f"--split must be train, valid or test, not {split!r}")
        if batch_size < 1:
            raise RnnlmError(f"--batch-size must be >= 1, got {batch_size}")
        directory = model_dir or Path("models") / (cell or "lstm")
        dev = pick_device(device)
        model, vocab = load_model_dir(directory, dev)
        corpus = load_ptb(data_dir, level=model.cfg.level)
        if corpus.vocab != vocab:
            raise RnnlmError(f"{directory}/vocab.txt does not match the vocabulary of the data")
        result = evaluate(model, corpus.split(split), start_id=vocab.eos_id, batch_size=batch_size, device=dev)
        return {"model": str(directory), "split": split, "batch_size": batch_size, **result.as_dict()}

    data = run(body)
    text = f"{data['split']}: {data['tokens']:,} tokens  nll {data['nll']:.2f} nats  ppl {data['ppl']:.3f}"
    if "bpc" in data:
        text += f"  bpc {data['bpc']:.4f}"
    emit(data, as_json, text)


@app.command()
def export(
    model_dir: Annotated[Path | None, typer.Argument(help="Checkpoint directory (or use --cell for models/<cell>).")] = None,
    cell: CellOpt = None,
    out: Annotated[Path | None, typer.Option(help="Bundle directory (default: <model>/onnx; <model>/onnx-quant or onnx-int8 with --quantize).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset, 17 or newer (native LayerNormalization).")] = 18,
    chunk: Annotated[int, typer.Option(help="Time steps per call of the scoring graph.")] = 32,
    quantize: Annotated[str | None, typer.Option(help="auto: each large product in the form measured fastest (fp32, "
                                                 "int8, 4-bit); int8: every large product int8. Checked by perplexity.")] = None,
    max_ppl_rise: Annotated[float, typer.Option(help="With --quantize: refuse a bundle whose PTB valid perplexity rises "
                                                "more than this fraction over float32.")] = 0.01,
    force: Annotated[bool, typer.Option(help="Replace --out even if it is not a bundle, or a bundle of another checkpoint.")] = False,
    triton: Annotated[Path | None, typer.Option(help="Also write an NVIDIA Triton model repository here (onnxruntime "
                                                "backend, sequence batcher with implicit state).")] = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a checkpoint to an ONNX bundle that onnxruntime serves without torch.

    Example: rnnlm export --cell rhn   (writes models/rhn/onnx)

    With --triton DIR, also DIR/rnnlm_<cell>/{config.pbtxt, 1/model.onnx, vocab.txt}: Triton keeps
    each sequence's recurrent state on the server between requests (see the README).

    Nothing is written unless onnxruntime agrees with PyTorch (|Δ log p| <= 1e-4 at batch 1 and 3,
    lengths 1, 7 and 64).
    """
    from rnnlm.export import export_bundle

    if triton is not None:  # refuse a shadowing folder before anything is written
        from rnnlm.export.exporter import refuse_shadowing

        run(lambda: refuse_shadowing(triton, "--triton"))
    summary = run(lambda: export_bundle(model_dir, cell=cell, out=out, opset=opset, chunk=chunk, quantize=quantize,
                                        max_ppl_rise=max_ppl_rise, force=force, data_dir=data_dir))
    if triton is not None:
        from rnnlm.export.triton import write_triton_repository

        summary["triton"] = str(run(lambda: write_triton_repository(summary["bundle"], triton, force=force)))
    text = (f"wrote {summary['bundle']} in {summary['seconds']} s; validated against PyTorch: max |Δ log p| "
            f"{summary['max_abs_logprob_diff']:.1e}")
    if "valid_ppl" in summary:
        text += f"; PTB valid ppl {summary['valid_ppl']:.2f}"
    if "quantization" in summary:
        q = summary["quantization"]
        text += (f"\nquantized ({q['mode']}): ppl {q['fp32_ppl']:.2f} -> {q['ppl']:.2f} ({q['ppl_rise']:+.2%}, at most "
                 f"{q['max_ppl_rise']:.2%}), scoring {q['scoring_speedup']:.2f}x faster; max |Δ log p| vs PyTorch "
                 f"{q['validation']['max_abs_logprob_diff']:.1e}\nproducts: "
                 + ", ".join(f"{k} {v}" for k, v in q["choices"].items()))
    if "triton" in summary:
        text += f"\nTriton model repository: {summary['triton']}"
    emit(summary, as_json, text)


ModelOpt = Annotated[Path | None, typer.Option("--model", help="Bundle or model directory (default: the newest bundle under ./models).")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when onnxruntime offers it and a GPU exists), cpu or cuda.")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads for onnxruntime (default: all cores).")]


@app.command()
def score(
    file: Annotated[str, typer.Argument(help="Text file to score, or - for standard input.")],
    model: ModelOpt = None,
    per_line: Annotated[bool, typer.Option(help="Score each line as its own sentence (state reset), batched.")] = False,
    per_token: Annotated[bool, typer.Option(help="Print every token with its natural-log probability.")] = False,
    raw: Annotated[bool, typer.Option(help="Take tokens as they are: no lower-casing, no numbers to N.")] = False,
    batch_size: Annotated[int, typer.Option(help="Lines per onnxruntime call with --per-line.")] = 64,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity of a text: tokens, OOV count, total NLL in nats, ppl (and bpc for characters).

    Every line ends in <eos>, which is scored (PTB convention). Examples:

      rnnlm score ../shared/data/ptb/ptb.test.txt --json

      echo "the stock market fell" | rnnlm score - --per-token
    """
    from rnnlm.serve.cli_impl import score_command

    run(lambda: score_command(file, model=model, per_line=per_line, per_token=per_token, raw=raw, batch_size=batch_size,
                              device=device, threads=threads, as_json=as_json))


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="Text to continue; empty starts a new sentence.")] = "",
    model: ModelOpt = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate per sample (1 to 10,000).")] = 50,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy (argmax).")] = 1.0,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely tokens only.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Sample from the smallest set with this much probability.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed: the same seed gives the same text.")] = None,
    num_samples: Annotated[int, typer.Option(help="Independent samples, generated in one batch.")] = 1,
    no_stop: Annotated[bool, typer.Option("--no-stop", help="Do not stop at <eos>.")] = False,
    raw: Annotated[bool, typer.Option(help="Take the prompt's tokens as they are.")] = False,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate text from a prompt, streaming tokens as they come.

    Example: rnnlm generate --prompt "the stock market" --temperature 0.8 --seed 7
    """
    from rnnlm.serve.cli_impl import generate_command

    run(lambda: generate_command(prompt, model=model, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=seed, num_samples=num_samples, stop=not no_stop, raw=raw,
                                 device=device, threads=threads, as_json=as_json))


@app.command()
def serve(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind; loopback unless you mean to expose it (0.0.0.0).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one).")] = 8000,
    max_concurrency: Annotated[int, typer.Option(help="onnxruntime calls at once; about one per core.")] = 2,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a slot; beyond that, 429 at once.")] = 64,
    max_batch: Annotated[int, typer.Option(help="Sequences of concurrent score requests scored in one call; 1 turns batching off.")] = 32,
    timeout: Annotated[float, typer.Option(help="Seconds a request may take, body included; past it, 504 and its work is cancelled.")] = 60.0,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body; larger gets 413 before it is read.")] = 1 << 20,
    max_generate_tokens: Annotated[int, typer.Option(help="Largest n * max_tokens of one generate request.")] = 65_536,
    grace: Annotated[float, typer.Option(help="Seconds in-flight requests get to finish after SIGTERM.")] = 30.0,
    raw: Annotated[bool, typer.Option(help="Take tokens as they are: no lower-casing, no numbers to N.")] = False,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    log_level: Annotated[str, typer.Option(help="critical, error, warning, info or debug.")] = "info",
) -> None:
    """Serve scoring and generation over HTTP (FastAPI + uvicorn; needs the `server` extra).

    Endpoints: POST /v1/score, POST /v1/generate (stream=true for server-sent events), GET /v1/model,
    GET /v2/health/live and /v2/health/ready (KServe v2), GET /metrics (Prometheus), /docs.

    Example: rnnlm serve --model models/lstm, then

      curl -s localhost:8000/v1/score -H 'content-type: application/json' -d '{"lines": ["the stock market fell"]}'

    SIGTERM drains: readiness turns off, in-flight requests finish (up to --grace), exit 0.
    """
    try:
        from rnnlm.serve.daemon import run_server
        from rnnlm.serve.server import ServerSettings
    except ImportError as e:
        raise fail(f"rnnlm serve needs the server extra ({e.name} is missing): pip install 'rnnlm[server]'") from None
    if log_level not in ("critical", "error", "warning", "info", "debug"):
        raise fail(f"--log-level must be critical, error, warning, info or debug, not {log_level!r}")
    settings = ServerSettings(max_concurrency=max_concurrency, max_queue=max_queue, max_batch=max_batch, timeout=timeout,
                              max_body_bytes=max_body_bytes, max_generate_tokens=max_generate_tokens, device=device,
                              threads=threads, raw=raw)
    code = run(lambda: run_server(model, host=host, port=port, settings=settings, grace=grace, log_level=log_level))
    raise typer.Exit(code)


def main() -> None:
    os.environ.setdefault("PYTHONIOENCODING", "utf-8")
    try:
        app()
    except BrokenPipeError:  # `rnnlm score ... | head`
        sys.stderr.close()
        sys.exit(0)
