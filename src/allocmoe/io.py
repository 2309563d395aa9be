"""Atomic file writes and JSON loading with one-line errors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import FileFormatError, OutputExistsError, OutputPathError


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target.

    A reader never sees a half-written file, and an interrupted write leaves the old file intact.
    `overwrite=False`: the temp file is linked into place instead, so an existing target (even one that
    appeared a moment ago) raises FileExistsError and is left alone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except (NotImplementedError, PermissionError):  # no hard links here: check, then rename
                if os.path.lexists(path):
                    raise FileExistsError(17, "File exists", str(path)) from None
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
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
    except RecursionError:
        raise FileFormatError(f"{what} {p} is nested too deeply to read") from None


def _signature(p: Path) -> tuple | None:
    try:
        st = p.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class OutputTarget:
    """An output file checked before the work (`prepare_output`); its final write never clobbers a file that
    appeared (or changed) at the path while the work ran: it goes beside it, `<stem>.1<suffix>`, ..., and
    `notice` says so in one line."""

    def __init__(self, path: Path, force: bool, companions=()):
        self.path, self.force, self.companions = path, force, tuple(companions)
        self.notice: str | None = None
        self._seen = self._signatures(path)

    def _group(self, p: Path) -> list[Path]:
        return [p, *(Path(f(p)) for f in self.companions)]

    def _signatures(self, p: Path) -> list:
        return [_signature(q) for q in self._group(p)]

    def final_path(self) -> Path:
        """Where the result goes: the checked path, unless something appeared or changed there since the check."""
        if self._signatures(self.path) == self._seen:
            return self.path
        for n in range(1, 1000):
            alt = self.path.with_name(f"{self.path.stem}.{n}{self.path.suffix}")
            if not any(os.path.lexists(q) for q in self._group(alt)):
                self.notice = (f"{self.path} appeared while this command ran; left it alone and wrote "
                               f"{alt} instead")
                return alt
        raise OutputExistsError(f"{self.path} appeared while this command ran, and no free name is beside it")

    def write_bytes(self, data: bytes) -> Path:
        """Write atomically to `final_path()` (replacing the old file only if it was there, unchanged, under
        force); returns the path written."""
        for _ in range(3):
            p = self.final_path()
            try:
                atomic_write_bytes(p, data, overwrite=p == self.path and self._seen[0] is not None)
            except FileExistsError:  # it appeared between the check and the write: go beside it
                self._seen = [object()] * len(self._seen)
                continue
            return p
        raise OutputExistsError(f"{self.path} keeps appearing while this command writes; nothing written")

    def write_text(self, text: str) -> Path:
        return self.write_bytes(text.encode("utf-8"))

    def write_json(self, obj: Any) -> Path:
        return self.write_text(dumps_json(obj))


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """The checks on an output path that no --force lifts: not a directory, not under a regular file, and a
    folder (created if missing) that accepts new files. Raises OutputPathError in one line."""
    p = Path(path)
    if str(path).strip() == "":
        raise OutputPathError(f"the {what} path is empty", param="out")
    if p.is_dir():
        raise OutputPathError(f"{what} {p} is a directory; give a file path", param="out")
    if os.path.lexists(p) and not p.is_file():
        raise OutputPathError(f"{what} {p} exists and is not a regular file", param="out")
    for a in [p.parent, *p.parent.parents]:
        if a.exists():
            if not a.is_dir():
                raise OutputPathError(f"cannot write {what} {p}: {a} is a file, not a folder", param="out")
            break
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot write {what} {p}: cannot create the folder {p.parent} ({e.strerror or e})",
                              param="out") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=p.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"cannot write {what} {p}: the folder {p.parent} does not accept new files "
                              f"({e.strerror or e})", param="out") from None
    return p


def prepare_output(path: str | os.PathLike, force: bool = False, *, what: str = "output",
                   companions=()) -> OutputTarget:
    """Check an output file before any work: the path checks (`check_output_path`), and an existing file
    (or companion: functions of the path naming files written with it) is refused unless `force`.
    Returns the target to write the result through (`OutputTarget.write_json` / `final_path`)."""
    p = check_output_path(path, what)
    for q in [p, *(Path(f(p)) for f in companions)]:
        if q.is_dir():
            raise OutputPathError(f"{q} is a directory; it is written beside {what} {p}", param="out")
        if q.exists() and not force:
            raise OutputExistsError(f"{q} already exists; refusing to overwrite it", param="force")
    return OutputTarget(p, force, companions)


def prepare_output_dir(path: str | os.PathLike, force: bool = False) -> Path:
    """Check (and create) an output folder before any work: not a file, not under a file, writable, and
    empty unless `force`."""
    p = Path(path)
    if os.path.lexists(p) and not p.is_dir():
        raise OutputPathError(f"{p} exists and is not a directory", param="out")
    for a in p.parents:
        if a.exists():
            if not a.is_dir():
                raise OutputPathError(f"cannot create output folder {p}: {a} is a file, not a folder", param="out")
            break
    if p.exists() and any(p.iterdir()) and not force:
        raise OutputExistsError(f"{p} is not empty; refusing to overwrite its files", param="force")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".allocmoe.", suffix=".probe", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"cannot write into output folder {p} ({e.strerror or e})", param="out") from None
    return p
