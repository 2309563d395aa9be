"""Text data: the built-in calibration/validation splits, user files, and fixed-length token windows."""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path

import torch

from .errors import DataError, SettingsError


def builtin_text(split: str) -> Path:
    """Path of a shipped split of the built-in corpus: 'calibration', 'validation' or 'ood' (out-of-domain)."""
    p = Path(str(resources.files("allocmoe") / "assets" / "data" / f"{split}.txt"))
    if not p.exists():
        raise DataError(f"built-in {split} text is missing ({p}); reinstall allocmoe or give your own text", param="data")
    return p


def read_texts(paths: list[str | os.PathLike] | None, default_split: str) -> tuple[list[str], list[str]]:
    """(texts, names). With no paths, the built-in split. Empty files are a one-line DataError."""
    if not paths:
        paths = [builtin_text(default_split)]
    texts, names = [], []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise DataError(f"text file {p} does not exist")
        try:
            t = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"text file {p} is not UTF-8 text") from None
        if not t.strip():
            raise DataError(f"text file {p} is empty")
        texts.append(t)
        names.append(str(p))
    return texts, names


def token_windows(tokenizer, texts: list[str], seq_len: int, max_tokens: int | None = None,
                  name: str = "calibration text") -> torch.Tensor:
    """Concatenate the texts' tokens (separated by EOS when the tokenizer has one) into [N, seq_len] windows.

    Non-overlapping windows from the start; the remainder shorter than seq_len is dropped. `max_tokens`
    caps N * seq_len (rounded down to whole windows, at least one).
    """
    if tokenizer is None:
        raise DataError("the model has no tokenizer; cannot tokenize text")
    if seq_len < 2:
        raise SettingsError(f"seq_len must be at least 2, got {seq_len}", param="seq_len")
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"{name} is too short: {len(ids)} tokens, fewer than one window of {seq_len} "
                        "(give more text or a smaller seq_len)", param="seq_len")
    if max_tokens is not None:
        n = max(1, min(n, max_tokens // seq_len))
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def fingerprint_tokens(windows: torch.Tensor) -> str:
    return "sha256:" + hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
