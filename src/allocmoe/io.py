"""Atomic file writes and JSON loading with one-line errors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import FileFormatError, OutputExistsError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target.

    A reader never sees a half-written file, and an interrupted write leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys are NOT used (field order is part of readability), fixed indent."""
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj))


def check_can_write(path: str | os.PathLike, force: bool = False) -> None:
    """Refuse to silently overwrite an existing file."""
    p = Path(path)
    if p.exists() and not force:
        raise OutputExistsError(f"{p} already exists; refusing to overwrite it", param="force")


def load_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    p = Path(path)
    if not p.exists():
        raise FileFormatError(f"{what} {p} does not exist")
    if p.is_dir():
        raise FileFormatError(f"{what} {p} is a directory, expected a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FileFormatError(f"{what} {p} is not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{what} {p} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
