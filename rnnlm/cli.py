"""The ``rnnlm`` command line. Each command imports its stage lazily and calls one plain function
that the Python API exposes too; errors become one line on stderr and a non-zero exit code."""

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from rnnlm.errors import RnnlmError
from rnnlm.reports import LOSS_MEANING, export_text, train_summary

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
            rows = {name: {"cell": p.model.cell, "loss": p.train.loss, "description": p.description}
                    for name, p in PRESETS.items()}
            emit({"presets": rows}, as_json, "\n".join(f"{n:26s} {r['cell']:10s} {r['loss']:11s} {r['description']}"
                                                       for n, r in rows.items()))
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
        lines += [f"loss: {LOSS_MEANING[train_cfg.loss]}"]
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
    train_file: Annotated[Path | None, typer.Option("--train", help="Your own training text (any name, anywhere); "
                                                    "needs --valid. Default: Penn Treebank.")] = None,
    valid_file: Annotated[Path | None, typer.Option("--valid", help="Validation text for --train.")] = None,
    test_file: Annotated[Path | None, typer.Option("--test", help="Test text for --train (optional).")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="Keep the N most frequent training tokens (<unk> and <eos> "
                                                   "included); the rest become <unk>.")] = None,
    min_count: Annotated[int, typer.Option(help="Drop training tokens seen fewer than K times (to <unk>).")] = 1,
    lowercase: Annotated[bool | None, typer.Option("--lowercase/--no-lowercase", help="Lower-case the text "
                                                   "(default: the preset's; off).")] = None,
    numbers: Annotated[str | None, typer.Option(help="Map numbers (1,000 3.5 -2) to this token, as PTB writes N; "
                                                "'' keeps them.")] = None,
    blank_lines: Annotated[str | None, typer.Option(help="eos: a blank line is an empty sentence (one <eos>); "
                                                    "skip: ignore it.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a language model on Penn Treebank or your own text and write a checkpoint directory.

    Example: rnnlm train --cell rhn --time-budget 20 --data-dir ../shared/data/ptb

    Your own corpus: rnnlm train --train my.train.txt --valid my.valid.txt --vocab-size 20000 --lowercase
    --numbers N --out models/mine. The normalization you choose is recorded in the checkpoint and in
    every bundle exported from it, and applied identically by eval, score, rescore and serve.

    Ctrl-C (or SIGTERM) finishes the step, saves, and exits 130 (143); --resume continues exactly.

    Data-parallel: torchrun --nproc-per-node 2 -m rnnlm train --cell lstm --device cpu   (gloo; NCCL
    on CUDA). Each process trains a share of the batch's streams; rank 0 alone writes.
    """
    from rnnlm.train import train as train_fn

    normalization = {"lowercase": lowercase, "numbers": numbers, "blank_lines": blank_lines}
    settings = [*(overrides or []), *(f"{k}={v}" for k, v in normalization.items() if v is not None)]
    result = run(lambda: _reported_once(lambda: train_fn(
        cell=cell, preset=preset, level=level, data_dir=data_dir, out=out, epochs=epochs,
        max_steps=max_steps, time_budget=time_budget, seed=seed, device=device, resume=resume,
        force=force, overrides=settings, dry_run=dry_run, tensorboard=tensorboard,
        files=own_files(train_file, valid_file, test_file), vocab_size=vocab_size, min_count=min_count)))
    if result.rank == 0:  # under torchrun, one summary, not one per process
        data, text = train_summary(result, dry_run)
        emit(data, as_json, text)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def own_files(train: Path | None, valid: Path | None, test: Path | None) -> Any:
    """--train/--valid/--test as DataFiles, or None for PTB; --valid or --test alone is refused."""
    if train is None:
        if valid is not None or test is not None:
            raise fail("--valid and --test go with --train (your own corpus); without --train, PTB is used")
        return None
    if valid is None:
        raise fail("--train needs --valid: a validation text picks the best weights")
    from rnnlm.data import DataFiles

    return DataFiles(train, valid, test)


def _reported_once(fn: Callable[[], T]) -> T:
    """Under torchrun, an error of rank 0 is printed by rank 0 alone: the other ranks exit with its code quietly."""
    from rnnlm.distributed import ReportedByRank0

    try:
        return fn()
    except ReportedByRank0 as e:
        raise typer.Exit(e.code) from None


@app.command("eval")
def eval_cmd(
    model_dir: Annotated[Path | None, typer.Argument(help="Checkpoint directory (default: models/<cell>).")] = None,
    cell: CellOpt = None,
    split: Annotated[str, typer.Option(help="valid or test (or train): the file the checkpoint was trained with.")] = "valid",
    file: Annotated[Path | None, typer.Option("--file", help="Evaluate this text instead of a split, with the model's "
                                              "own tokenizer.")] = None,
    batch_size: Annotated[int, typer.Option(help="1 is exact: one stream, the state carried through the split.")] = 1,
    data_dir: DataDirOpt = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a checkpoint exactly: tokens, OOVs, total NLL in nats, perplexity (and bpc at char level).

    --split reads the file the checkpoint records in data.json (refused if it changed since);
    --data-dir, or a checkpoint without data.json, reads PTB's. Examples:

      rnnlm eval models/rhn --split test --json

      rnnlm eval models/mine --file other.txt
    """

    def body() -> dict[str, Any]:
        from rnnlm.evaluate import evaluate_checkpoint
        from rnnlm.train import pick_device

        directory = model_dir or Path("models") / (cell or "lstm")
        return evaluate_checkpoint(directory, split=split, file=file, batch_size=batch_size, data_dir=data_dir,
                                   device=pick_device(device))

    data = run(body)
    text = f"{data.get('split', data['file'])}: {data['tokens']:,} tokens ({data['oov']:,} OOV)  nll {data['nll']:.2f} nats  ppl {data['ppl']:.3f}"
    if "bpc" in data:
        text += f"  bpc {data['bpc']:.4f}"
    emit(data, as_json, text)


@app.command()
def export(
    model_dir: Annotated[Path | None, typer.Argument(help="Checkpoint directory (or use --cell for models/<cell>).")] = None,
    cell: CellOpt = None,
    out: Annotated[Path | None, typer.Option(help="Bundle directory (default: <model>/onnx; <model>/onnx-quant or onnx-int8 with --quantize).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset, 17 or newer (native LayerNormalization).")] = 18,
    chunk: Annotated[int, typer.Option(help="Most time steps per call of the scoring graph (a call runs as many as "
                                       "its longest sequence needs, up to this).")] = 32,
    advance_chunk: Annotated[int, typer.Option(help="Most time steps per call of the advance graph, which reads prompts "
                                               "(0: leave it out).")] = 128,
    quantize: Annotated[str | None, typer.Option(help="auto: each large product in the form measured fastest (fp32, "
                                                 "int8, 4-bit for generation), then whole layouts timed (an LSTM layer as a "
                                                 "Scan or ONNX's LSTM operator) on this machine's threads: export where you "
                                                 "serve; int8: every large product int8. Checked by perplexity.")] = None,
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
                                        max_ppl_rise=max_ppl_rise, force=force, data_dir=data_dir,
                                        advance_chunk=advance_chunk))
    if triton is not None:
        from rnnlm.export.triton import write_triton_repository

        summary["triton"] = str(run(lambda: write_triton_repository(summary["bundle"], triton, force=force)))
    emit(summary, as_json, export_text(summary))


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
    fmt: Annotated[str, typer.Option("--format", help="text (rnnlm's, in nats), or srilm / kenlm: every line a sentence, "
                                     "in the layout of SRILM's `ngram -ppl` or KenLM's `query` (log10).")] = "text",
    debug: Annotated[int, typer.Option(help="With --format srilm: 1 adds per-sentence, 2 per-word lines (SRILM's -debug).")] = 0,
    no_bos: Annotated[bool, typer.Option("--no-bos", help="With --format srilm/kenlm: each line continues the previous "
                                         "one's context instead of starting from the <eos> state.")] = False,
    no_eos: Annotated[bool, typer.Option("--no-eos", help="With --format srilm/kenlm: do not predict </s> (<eos>) "
                                         "at the end of a line.")] = False,
) -> None:
    """Perplexity of a text: tokens, OOV count, total NLL in nats, ppl (and bpc for characters).

    Every line ends in <eos>, which is scored (PTB convention). Examples:

      rnnlm score ../shared/data/ptb/ptb.test.txt --json

      echo "the stock market fell" | rnnlm score - --per-token

      rnnlm score sentences.txt --format srilm --debug 2    (log10, SRILM's `ngram -ppl` layout)
    """
    from rnnlm.serve.cli_impl import score_command

    run(lambda: score_command(file, model=model, per_line=per_line, per_token=per_token, raw=raw, batch_size=batch_size,
                              device=device, threads=threads, as_json=as_json, fmt=fmt, debug=debug, bos=not no_bos,
                              eos=not no_eos))


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
def rescore(
    nbest: Annotated[str, typer.Argument(help="N-best list (or - for standard input); for srilm, one list or a file listing them.")],
    model: ModelOpt = None,
    fmt: Annotated[str | None, typer.Option("--format", help="kaldi, srilm, nemo or lines (default: detected from the first line).")] = None,
    scores: Annotated[list[str] | None, typer.Option("--scores", help="NAME=FILE: a Kaldi score file ('key cost'), matched by key (repeatable).")] = None,
    weight: Annotated[list[str] | None, typer.Option("--weight", help="NAME=W: the weight of a score in the total (default 1; repeatable).")] = None,
    lm_weight: Annotated[float, typer.Option(help="Weight of the LM cost (the rnnlm cost, or the interpolated one).")] = 1.0,
    word_penalty: Annotated[float, typer.Option(help="Added to the total per word (positive favours shorter hypotheses).")] = 0.0,
    interpolate: Annotated[float | None, typer.Option(help="λ: LM cost = λ·rnnlm + (1−λ)·n-gram (the --ngram-score score).")] = None,
    ngram_score: Annotated[str, typer.Option(help="The score that --interpolate mixes with (srilm lists call theirs lm).")] = "lm",
    beam_size: Annotated[int | None, typer.Option(help="Rows per utterance of a NeMo TSV.")] = None,
    group: Annotated[str | None, typer.Option(help="For --format lines: a file with the utterance id of each line.")] = None,
    carry_over: Annotated[str, typer.Option(help="never, always, or speaker: start an utterance from the state the "
                                            "previous (same-speaker) utterance's best hypothesis ended in.")] = "never",
    utt2spk: Annotated[str | None, typer.Option(help="Kaldi utt2spk file, for --carry-over speaker.")] = None,
    ref: Annotated[str | None, typer.Option(help="Reference transcripts ('uttid text'): grid-search the weights for the lowest WER.")] = None,
    grid_lm_weight: Annotated[str, typer.Option(help="--ref grid of lm-weight: START:STOP:STEP or a,b,c.")] = "0:2:0.1",
    grid_word_penalty: Annotated[str, typer.Option(help="--ref grid of word-penalty.")] = "-2:2:0.5",
    grid_interpolate: Annotated[str, typer.Option(help="--ref grid of λ (with --interpolate).")] = "0:1:0.1",
    costs: Annotated[str | None, typer.Option(help="Write the rnnlm cost of every hypothesis here ('key cost', −ln P).")] = None,
    totals: Annotated[str | None, typer.Option(help="Write the combined score of every hypothesis here ('key total').")] = None,
    best: Annotated[str | None, typer.Option(help="Write the best hypotheses here too ('uttid text').")] = None,
    batch_size: Annotated[int, typer.Option(help="Hypotheses per onnxruntime call.")] = 128,
    raw: Annotated[bool, typer.Option(help="Take tokens as they are: no lower-casing, no numbers to N.")] = False,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rescore n-best lists (Kaldi, SRILM, NeMo, plain lines) and print the best hypothesis per utterance.

    Every score is a cost in nats (−ln P). total = Σ w_i·score_i + lm-weight·lm + word-penalty·words;
    the lowest total wins. Output: 'uttid text' per utterance (--json: every hypothesis and score).
    Examples:

      rnnlm rescore nbest.txt --scores am=am.scores --scores lm=lm.scores --interpolate 0.5 --costs rnn.scores > text

      rnnlm rescore beams.tsv --format nemo --beam-size 8 --lm-weight 0.5 --ref ref.txt
    """
    from rnnlm.serve.cli_impl import load
    from rnnlm.serve.rescore_cli import RescoreOptions, rescore_command

    options = RescoreOptions(
        nbest=nbest, fmt=fmt, scores=scores or [], weights=weight or [], lm_weight=lm_weight, word_penalty=word_penalty,
        interpolate=interpolate, ngram_score=ngram_score, beam_size=beam_size, group=group, carry_over=carry_over,
        utt2spk=utt2spk, ref=ref, grid_lm_weight=grid_lm_weight, grid_word_penalty=grid_word_penalty,
        grid_interpolate=grid_interpolate, costs=costs, totals=totals, best=best, as_json=as_json, batch_size=batch_size)
    run(lambda: rescore_command(options, lambda: load(model, device=device, threads=threads, raw=raw)))

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
    max_sessions: Annotated[int, typer.Option(help="Open sessions (/v1/sessions) at once; each holds one state.")] = 1024,
    session_ttl: Annotated[float, typer.Option(help="Seconds a session may stay unused before it is closed.")] = 600.0,
    raw: Annotated[bool, typer.Option(help="Take tokens as they are: no lower-casing, no numbers to N.")] = False,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    thread_pool: Annotated[str, typer.Option(help="shared: one onnxruntime thread pool for all of the model's graphs "
                                             "(they take turns without taking cores from each other); per-session: "
                                             "a pool per graph.")] = "shared",
    log_level: Annotated[str, typer.Option(help="critical, error, warning, info or debug.")] = "info",
) -> None:
    """Serve scoring and generation over HTTP (FastAPI + uvicorn; needs the `server` extra).

    Endpoints: POST /v1/score, POST /v1/generate (stream=true for server-sent events), GET /v1/model,
    GET /v2/health/live and /v2/health/ready (KServe v2), GET /metrics (Prometheus), /docs;
    OpenAI's POST /v1/completions and GET /v1/models, POST /tokenize, POST /detokenize, GET /tokenizer_info;
    stateful sessions under /v1/sessions (score, generate, fork, export and import a state).

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
                              threads=threads, thread_pool=thread_pool, raw=raw, max_sessions=max_sessions,
                              session_ttl=session_ttl)
    code = run(lambda: run_server(model, host=host, port=port, settings=settings, grace=grace, log_level=log_level))
    raise typer.Exit(code)


# Commands that run on the serving runtime alone and leave nothing for interpreter shutdown to do:
# their output is flushed and files closed when they return. Their process then ends at once, as
# the interpreter's own shutdown after importing numpy and onnxruntime costs 35-60 ms of a 0.3-0.4 s
# `rnnlm score` (bench/RESULTS.md, "Goals, session 9").
QUICK_EXIT = frozenset({"score", "generate", "rescore"})


def main() -> None:
    os.environ.setdefault("PYTHONIOENCODING", "utf-8")
    try:
        app()
    except BrokenPipeError:  # `rnnlm score ... | head`
        sys.stderr.close()
        sys.exit(0)
    except SystemExit as e:
        if len(sys.argv) > 1 and sys.argv[1] in QUICK_EXIT and (e.code is None or isinstance(e.code, int)):
            _exit_now(e.code or 0)
        raise


def _exit_now(code: int) -> None:
    """Flush what the command wrote, then end the process without the interpreter's shutdown."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that left (BrokenPipeError), a closed stream
            stream.flush()
    os._exit(code)
