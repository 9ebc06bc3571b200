"""Checkpoint directories: the trained model as a directory a person can read.

    models/<cell>/
        model.safetensors   best weights (by validation perplexity)
        config.json         ModelConfig: the model's whole contract
        vocab.txt           one token per line, line number = id
        data.json           the text normalization and every file trained on (sha256, size, lines, tokens, OOVs)
        train_config.json   how it was trained
        metrics.jsonl       one line per evaluation
        curves.png          train and valid perplexity against tokens seen
        train_state.pt      latest weights, optimizer, position, random states: for --resume

Every file is written atomically, and weights are checked finite before they are written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from rnnlm.config import ModelConfig, TrainConfig
from rnnlm.errors import RnnlmError
from rnnlm.fsutil import atomic_write_text, atomic_write_with
from rnnlm.model import LanguageModel
from rnnlm.vocab import Vocabulary

WEIGHTS, CONFIG, VOCAB, TRAIN_CONFIG, TRAIN_STATE, DATA = (
    "model.safetensors", "config.json", "vocab.txt", "train_config.json", "train_state.pt", "data.json",
)


def check_finite(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise RnnlmError(f"refusing to write a checkpoint: parameter {name} is not finite", code=3)


def save_model_dir(out: Path, model: LanguageModel, vocab: Vocabulary, train_cfg: TrainConfig | None = None) -> None:
    """Write the weights, config and vocabulary (each atomically). The weights file goes last."""
    check_finite(model)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG, model.cfg.to_json())
    vocab.save(out / VOCAB)
    if train_cfg is not None:
        atomic_write_text(out / TRAIN_CONFIG, json.dumps(dataclasses.asdict(train_cfg), indent=2) + "\n")
    atomic_write_with(out / WEIGHTS, lambda tmp: save_model(model, tmp, metadata={"format": "pt"}))


def read_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RnnlmError(f"no checkpoint at {model_dir}: {CONFIG} is missing (train one with `rnnlm train`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RnnlmError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RnnlmError(f"{path}: expected a JSON object")
    return ModelConfig.from_dict(data)


def load_model_dir(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[LanguageModel, Vocabulary]:
    """Rebuild the model from a checkpoint directory, in eval mode. Refuses anything inconsistent."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise RnnlmError(f"no checkpoint directory at {model_dir}")
    cfg = read_config(model_dir)
    vocab = Vocabulary.load(model_dir / VOCAB)
    if len(vocab) != cfg.vocab_size:
        raise RnnlmError(f"{model_dir / VOCAB}: {len(vocab)} tokens, but config.json says vocab_size {cfg.vocab_size}")
    model = LanguageModel(cfg)
    weights = model_dir / WEIGHTS
    if not weights.is_file():
        raise RnnlmError(f"no checkpoint at {model_dir}: {WEIGHTS} is missing")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise RnnlmError(f"{weights}: cannot read the weights ({type(e).__name__}: {e})") from None
    if missing or unexpected:
        raise RnnlmError(f"{weights}: does not match config.json (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    return model.to(device).eval(), vocab


def read_data_record(model_dir: Path) -> dict[str, Any] | None:
    """``data.json``: what the model was trained on (None for a checkpoint written before it existed)."""
    path = Path(model_dir) / DATA
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RnnlmError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise RnnlmError(f"{path}: expected an object with a 'files' entry")
    return data


def save_train_state(out: Path, state: dict[str, Any]) -> None:
    atomic_write_with(out / TRAIN_STATE, lambda tmp: torch.save(state, tmp))


def load_train_state(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / TRAIN_STATE
    if not path.is_file():
        raise RnnlmError(f"cannot resume: no {TRAIN_STATE} in {model_dir} (start without --resume)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RnnlmError(f"cannot resume: {path} is unreadable ({type(e).__name__}: {e})") from None
