#!/usr/bin/env python
"""Build the public-domain English prose corpus for allocmoe's built-in default model.

Deterministic and re-runnable.  Steps:

1. ``apt-get download`` a handful of Debian packages into ``corpus_build/debs/``
   (skipped when the .deb files are already cached there) and unpack them with
   ``dpkg-deb -x`` into ``corpus_build/extract/``.
2. Read the texts:
   * ``r-cran-janeaustenr`` -- Jane Austen's six novels, stored as an R lazy-load
     database (``data/Rdata.rdx`` index + ``data/Rdata.rdb`` objects).  The
     index is gzip-compressed R serialisation; each object is a 4-byte
     big-endian length header followed by a zlib stream of R serialisation.
     The R serialisation itself is decoded with the ``rdata`` package.
   * ``sword-text-web``, ``sword-text-kjv``, ``sword-comm-tdavid``,
     ``sword-comm-mhcc``, ``sword-comm-scofield`` -- SWORD modules (zText /
     zCom / zCom4 drivers).
     ``*.?zs`` holds 12-byte ``<III`` block records (offset, size,
     uncompressed size) into the zlib-compressed ``*.?zz`` file; ``*.?zv``
     holds one record per verse/entry, ``<IIH`` (block, offset, size; 10 bytes)
     for zText/zCom or ``<III`` (12 bytes) for zText4/zCom4, pointing into the
     *decompressed* block.  OSIS / ThML / GBF markup is stripped, footnotes and
     cross references dropped.
   * ``dict-jargon`` (the Jargon File), ``dict-devil`` (Bierce's Devil's Dictionary),
     ``dict-wn`` (WordNet 3.0 glosses; training split only) -- dictd databases: a
     ``.index`` of ``headword<TAB>offset<TAB>length`` (dictd base64 numbers)
     into the gzip-compatible ``.dict.dz``; dictionary markup is stripped to
     readable definition prose (:func:`dictd_entry_to_text`, :func:`wordnet_entry_to_text`).
   Corpus v3 drops GCIDE (GPL-2+): nothing shipped or trained on comes from it.
3. Cut every source into contiguous chunks of whole paragraphs (>= CHUNK_CHARS
   characters) and assign each chunk to a split by a hash of
   ``"<source>:<chunk index>"`` (see :func:`split_of`).
   One whole source, :data:`OOD_SOURCE` (the Devil's Dictionary), is held out
   of all three splits as the out-of-domain split.
4. Write ``corpus_build/{train,validation,calibration,ood}.txt`` (the held-out
   splits interleaved across sources), check that the v1 corpus's (original
   five packages) held-out chunks are still held out of the v2 training split,
   and copy ``ood.txt`` into ``src/allocmoe/assets/data/`` (``--copy-splits``:
   also the validation and calibration splits).

Usage::

    .venv/bin/python scripts/build_corpus.py            # full build
    .venv/bin/python scripts/build_corpus.py --offline  # reuse cached .debs only
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "corpus_build"
ASSET_DATA = REPO / "src" / "allocmoe" / "assets" / "data"

#: SWORD module packages.  The first four are the original (v1) corpus; the
#: rest were added for issue 14 (a broader corpus).
SWORD_PACKAGES = [
    "sword-text-web",
    "sword-text-kjv",
    "sword-comm-tdavid",
    "sword-comm-mhcc",
    "sword-comm-scofield",
]
#: dictd databases (``usr/share/dictd/<name>.index`` + ``<name>.dict.dz``): package -> database name.
DICTD_PACKAGES = {
    "dict-jargon": "jargon",
    "dict-devil": "devil",
    "dict-wn": "wn",
}
#: Sources used for training only: every chunk goes to the training split, none to the shipped
#: held-out splits.  WordNet's licence is permissive but asks for its notice on every copy of the
#: database, so none of its text is shipped.  (GCIDE, GPL-2+, was dropped in corpus v3.)
TRAIN_ONLY_SOURCES = {"dictd-wn"}
#: Debian packages used (Debian 12 "bookworm", main).
PACKAGES = ["r-cran-janeaustenr", *SWORD_PACKAGES, *DICTD_PACKAGES]

#: Sources of the original (v1) corpus, on which the shipped default model was trained
#: (plus the six ``austen-*`` novels): the SWORD modules of the first four SWORD packages.
V1_SOURCES = {"sword-engWEB2015eb", "sword-engKJV2006eb", "sword-TDavid", "sword-MHCC"}

#: Whole source held out of training as the out-of-domain split (never chunked
#: into train/validation/calibration): Ambrose Bierce's *The Devil's Dictionary*
#: (satirical definitions, prose and verse, 1911) -- not in any training split.
OOD_SOURCE = "dictd-devil"
#: Cap of the shipped out-of-domain text (whole paragraphs, from the start of the source).
OOD_MAX_CHARS = 360_000

#: Minimum chunk size in characters (chunks end at paragraph boundaries).
CHUNK_CHARS = 8000
#: Split rule: bucket = int(sha256("<source>:<chunk index>")[:8], 16) % 1000.
VALIDATION_BUCKETS = range(0, 10)  # 1.0 %
CALIBRATION_BUCKETS = range(10, 20)  # 1.0 %


# --------------------------------------------------------------------------
# markup stripping
# --------------------------------------------------------------------------

_DROP_ELEMENTS = re.compile(
    r"<(note)\b[^>]*?(?<!/)>.*?</note\s*>",
    flags=re.DOTALL | re.IGNORECASE,
)
# GBF footnotes: <RF>...<Rf>
_GBF_NOTE = re.compile(r"<RF>.*?<Rf>", flags=re.DOTALL)
# tags that start a new paragraph / line
_BREAK_TAGS = re.compile(
    r"<(?:/?(?:p|div|title|lg|h[1-6])\b[^>]*|(?:chapter|br|lb)\b[^>]*|CM|CL|Pp|TS|Ts)>",
    flags=re.IGNORECASE,
)
_ANY_TAG = re.compile(r"<[^<>]*>")
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_MANY_NEWLINES = re.compile(r"\n{2,}")


def strip_markup(text: str, keep_edges: bool = False) -> str:
    """Strip OSIS / ThML / GBF markup from a SWORD entry and return plain text.

    Footnotes, cross references and GBF ``<RF>..<Rf>`` notes are removed with
    their content; block-level tags become paragraph breaks (``\\n``); every
    other tag is removed while its content is kept.  Entities are unescaped,
    runs of spaces collapsed, and lines stripped.  With ``keep_edges`` a
    paragraph break produced by markup at the very start or end of the entry is
    kept (as a single ``\\n``), so that joining entries preserves it.
    """
    text = _GBF_NOTE.sub(" ", text)
    text = _DROP_ELEMENTS.sub(" ", text)
    text = _BREAK_TAGS.sub("\n", text)
    text = _ANY_TAG.sub("", text)
    text = html.unescape(text)
    text = text.replace("\u00b6", " ")  # pilcrow paragraph marks
    lines = [_SPACES.sub(" ", ln).strip() for ln in text.split("\n")]
    text = "\n".join(lines)
    text = _MANY_NEWLINES.sub("\n", text)
    return text.strip(" ") if keep_edges else text.strip()


# --------------------------------------------------------------------------
# SWORD modules
# --------------------------------------------------------------------------


def parse_sword_conf(path: Path) -> dict[str, str]:
    """Parse a SWORD ``mods.d/*.conf`` file into a flat dict (first value wins)."""
    conf: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            conf.setdefault("__name__", line[1:-1])
            continue
        if "=" in line:
            k, v = line.split("=", 1)
            conf.setdefault(k.strip(), v.strip())
    return conf


def _index_entry_sizes(mod_drv: str) -> list[int]:
    """Candidate verse-index record sizes for a SWORD driver, most likely first."""
    if mod_drv.lower().endswith("4"):
        return [12, 10]
    return [10, 12]


def read_sword_testament(
    module_dir: Path, stem: str, entry_sizes: Iterable[int] = (10, 12)
) -> list[str]:
    """Read the raw (markup) entries of one SWORD testament file set.

    ``stem`` is e.g. ``"ot.bz"`` for ``ot.bzs`` / ``ot.bzz`` / ``ot.bzv``.
    Entries that share the same (block, offset, size) -- linked verses in a
    commentary -- are returned only once.  Empty entries are skipped.  The first
    record size in ``entry_sizes`` that divides the index file and whose
    records all point inside their blocks is used.
    """
    bzs = (module_dir / f"{stem}s").read_bytes()
    bzz = (module_dir / f"{stem}z").read_bytes()
    bzv = (module_dir / f"{stem}v").read_bytes()
    if not bzs or not bzv:
        return []
    if len(bzs) % 12:
        raise ValueError(f"{module_dir / (stem + 's')}: size {len(bzs)} is not a multiple of 12")
    blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs), 12)]

    cache: dict[int, bytes] = {}

    def block(i: int) -> bytes:
        if i not in cache:
            off, size, usize = blocks[i]
            data = zlib.decompress(bzz[off : off + size])
            if usize and len(data) != usize:
                raise ValueError(f"block {i}: expected {usize} bytes, got {len(data)}")
            cache[i] = data
        return cache[i]

    def records(esz: int) -> list[tuple[int, int, int]]:
        fmt = "<IIH" if esz == 10 else "<III"
        return [struct.unpack_from(fmt, bzv, i) for i in range(0, len(bzv), esz)]

    chosen = None
    for esz in entry_sizes:
        if len(bzv) % esz:
            continue
        recs = records(esz)
        ok = all(
            size == 0 or (b < len(blocks) and start + size <= blocks[b][2]) for b, start, size in recs
        )
        if ok:
            chosen = recs
            break
    if chosen is None:
        raise ValueError(f"{module_dir}: cannot determine verse index record size for {stem}")

    out: list[str] = []
    seen: set[tuple[int, int, int]] = set()
    for b, start, size in chosen:
        if size == 0 or (b, start, size) in seen:
            continue
        seen.add((b, start, size))
        raw = block(b)[start : start + size]
        out.append(raw.decode("utf-8", errors="replace"))
    return out


def read_sword_module(root: Path, conf_path: Path) -> tuple[dict[str, str], list[str]]:
    """Read all entries (OT then NT) of a SWORD module installed under ``root``.

    ``root`` is the directory that contains ``mods.d/`` and ``modules/``.
    Returns the parsed conf and the raw markup entries.
    """
    conf = parse_sword_conf(conf_path)
    data_path = (root / conf["DataPath"].lstrip("./")).resolve()
    sizes = _index_entry_sizes(conf.get("ModDrv", "zText"))
    entries: list[str] = []
    for testament in ("ot", "nt"):
        for kind in ("b", "c"):
            stem = f"{testament}.{kind}z"
            if (data_path / f"{stem}s").exists():
                entries.extend(read_sword_testament(data_path, stem, sizes))
    return conf, entries


def sword_entries_to_text(entries: Iterable[str], verse_sep: str = " ") -> str:
    """Strip markup from entries and join them into paragraph text.

    Consecutive verses are joined by ``verse_sep``; block-level markup in the
    entries (including at their edges) produces the paragraph breaks.
    """
    parts: list[str] = []
    for e in entries:
        t = strip_markup(e, keep_edges=True)
        if t.strip():
            parts.append(t)
    text = verse_sep.join(parts)
    text = re.sub(r" *\n *", "\n", text)
    return _MANY_NEWLINES.sub("\n", text).strip()


# --------------------------------------------------------------------------
# R lazy-load database (janeaustenr)
# --------------------------------------------------------------------------


def _r_unserialize(raw: bytes):
    import warnings

    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = rdata.parser.parse_data(raw)
    return rdata.conversion.convert(parsed)


def read_rdx_index(rdx: bytes) -> dict[str, tuple[int, int]]:
    """Decode an R lazy-load ``.rdx`` index: ``{name: (offset, length)}``."""
    if rdx[:2] == b"\x1f\x8b":
        raw = gzip.decompress(rdx)
    else:  # zlib with a 4-byte length header (R's own compression)
        raw = zlib.decompress(rdx[4:])
    idx = _r_unserialize(raw)
    variables = idx["variables"]
    return {str(k): (int(v[0]), int(v[1])) for k, v in variables.items()}


def read_rdb_object(rdb: bytes, offset: int, length: int):
    """Decode one object from an R lazy-load ``.rdb`` file.

    The record is a 4-byte big-endian uncompressed length followed by a zlib
    stream holding R serialisation.
    """
    blob = rdb[offset : offset + length]
    (ulen,) = struct.unpack(">I", blob[:4])
    raw = zlib.decompress(blob[4:])
    if len(raw) != ulen:
        raise ValueError(f"rdb object at {offset}: expected {ulen} bytes, got {len(raw)}")
    return _r_unserialize(raw)


def lines_to_paragraphs(lines: Iterable[str]) -> str:
    """Join hard-wrapped lines into paragraphs (blank lines separate paragraphs)."""
    paras: list[str] = []
    cur: list[str] = []
    for ln in lines:
        ln = str(ln).strip()
        if ln:
            cur.append(ln)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n".join(_SPACES.sub(" ", p) for p in paras)


#: janeaustenr object name -> title, in publication order.
AUSTEN_BOOKS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def read_austen(pkg_root: Path) -> dict[str, str]:
    """Return ``{book name: paragraph text}`` from an unpacked r-cran-janeaustenr."""
    data_dir = pkg_root / "usr/lib/R/site-library/janeaustenr/data"
    index = read_rdx_index((data_dir / "Rdata.rdx").read_bytes())
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    books = {}
    for name in AUSTEN_BOOKS:
        off, length = index[name]
        lines = read_rdb_object(rdb, off, length)
        books[name] = lines_to_paragraphs(lines)
    return books


# --------------------------------------------------------------------------
# dictd databases (GCIDE, Jargon File, Devil's Dictionary)
# --------------------------------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_b64(s: str) -> int:
    """Decode a dictd index number (base64 digits, most significant first, no padding)."""
    n = 0
    for c in s:
        n = n * 64 + _B64.index(c)
    return n


def read_dictd(index: bytes | str, data: bytes) -> list[tuple[str, str]]:
    """Entries ``(headword, body)`` of a dictd database, in file (offset) order.

    ``index`` is the ``.index`` file (``headword\toffset\tlength`` per line,
    numbers in dictd base64); ``data`` the *uncompressed* ``.dict`` file
    (``.dict.dz`` is gzip-compatible).  Entries that several headwords share
    are returned once; the ``00-database-*`` / ``00database*`` meta entries
    are skipped.
    """
    if isinstance(index, bytes):
        index = index.decode("utf-8", errors="replace")
    seen: dict[tuple[int, int], str] = {}
    for line in index.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        head = parts[0]
        if head.startswith("00-database") or head.startswith("00database"):
            continue
        key = (dictd_b64(parts[1]), dictd_b64(parts[2]))
        seen.setdefault(key, head)
    out = []
    for (off, length), head in sorted(seen.items()):
        out.append((head, data[off : off + length].decode("utf-8", errors="replace")))
    return out


def blocks_to_paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks of hard-wrapped lines -> one-line paragraphs."""
    paras = []
    for block in re.split(r"\n\s*\n", text):
        p = _SPACES.sub(" ", " ".join(ln.strip() for ln in block.splitlines())).strip()
        if p:
            paras.append(p)
    return paras


_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_BRACES = re.compile(r"[{}]")
_WN_SENSE = re.compile(r"^\s*(?:(?P<pos>n|v|adj|adv)\s+)?(?P<num>\d+):\s*", flags=re.MULTILINE)


def wordnet_entry_to_text(head: str, body: str, seen: set[str]) -> str:
    """One paragraph from a WordNet (dictd ``wn``) entry: ``headword (pos): gloss; gloss ...``.

    ``[syn: ...]`` / ``[ant: ...]`` groups and cross-reference braces are dropped; a gloss already
    emitted under another headword (WordNet repeats a synset's gloss under each of its words) is
    skipped, via ``seen``.  Returns "" when nothing new is left."""
    text = body.split("\n", 1)[1] if "\n" in body else ""
    text = _BRACES.sub("", _BRACKETS.sub("", text))
    senses, pos = [], None
    parts = _WN_SENSE.split(text)  # [pre, pos, num, gloss, pos, num, gloss, ...]
    for i in range(1, len(parts) - 2, 3):
        pos = parts[i] or pos
        gloss = _SPACES.sub(" ", " ".join(parts[i + 2].split())).strip(" ;")
        if not gloss or gloss in seen:
            continue
        seen.add(gloss)
        senses.append((pos, gloss))
    if not senses:
        return ""
    return f"{head.strip()}: " + "; ".join(f"({p}) {g}" if p else g for p, g in senses) + "."


def dictd_entry_to_text(head: str, body: str) -> str:
    """Readable prose from a Jargon File / Devil's Dictionary entry: the headword
    line(s) before the first blank line are joined into a heading paragraph when
    they do not already start the definition, cross-reference braces removed,
    ``_emphasis_`` marks dropped, hard-wrapped lines joined into paragraphs."""
    text = _BRACES.sub("", body)
    text = re.sub(r"(?<![A-Za-z0-9])_([^_\n]+)_(?![A-Za-z0-9])", r"\1", text)
    return "\n".join(blocks_to_paragraphs(text))


# --------------------------------------------------------------------------
# chunking and splitting
# --------------------------------------------------------------------------


def chunk_paragraphs(text: str, min_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut text into contiguous chunks of whole paragraphs, each >= ``min_chars``
    (except possibly the last, which is merged into its predecessor if short)."""
    chunks: list[str] = []
    cur: list[str] = []
    n = 0
    for p in text.split("\n"):
        if not p.strip():
            continue
        cur.append(p)
        n += len(p) + 1
        if n >= min_chars:
            chunks.append("\n".join(cur))
            cur, n = [], 0
    if cur:
        if chunks and n < min_chars // 2:
            chunks[-1] = chunks[-1] + "\n" + "\n".join(cur)
        else:
            chunks.append("\n".join(cur))
    return chunks


def split_of(source: str, index: int) -> str:
    """Deterministic split for chunk ``index`` of ``source``."""
    h = hashlib.sha256(f"{source}:{index}".encode()).hexdigest()
    bucket = int(h[:8], 16) % 1000
    if bucket in VALIDATION_BUCKETS:
        return "validation"
    if bucket in CALIBRATION_BUCKETS:
        return "calibration"
    return "train"


def assign_splits(sources: dict[str, str], min_chars: int = CHUNK_CHARS) -> dict[str, list[str]]:
    """Chunk every source and route chunks to splits. The training split is in source-name order; the
    held-out splits are interleaved across sources (:func:`interleave`), so that any prefix of them -- tools
    evaluate on the first N tokens -- mixes the sources in proportion, instead of being all Austen."""
    labelled: dict[str, list[tuple[str, str]]] = {"train": [], "validation": [], "calibration": []}
    for name in sorted(sources):
        for i, chunk in enumerate(chunk_paragraphs(sources[name], min_chars)):
            labelled["train" if name in TRAIN_ONLY_SOURCES else split_of(name, i)].append((name, chunk))
    return {split: [c for _, c in (pairs if split == "train" else interleave(pairs))]
            for split, pairs in labelled.items()}


def interleave(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Proportional interleave of (source, chunk) pairs: the j-th of a source's n chunks goes at position
    (j + 0.5) / n, ties broken by source name; each source keeps its own order."""
    count: dict[str, int] = {}
    for name, _ in pairs:
        count[name] = count.get(name, 0) + 1
    seen: dict[str, int] = {}
    keyed = []
    for name, chunk in pairs:
        j = seen.get(name, 0)
        seen[name] = j + 1
        keyed.append(((j + 0.5) / count[name], name, j, chunk))
    return [(name, chunk) for _, name, _, chunk in sorted(keyed)]


def write_if_changed(path: Path, text: str) -> None:
    """Leave an identical file alone (its mtime keys the trainer's token-id cache)."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------
# Debian packages
# --------------------------------------------------------------------------


@dataclass
class Deb:
    package: str
    version: str
    path: Path


def _deb_field(deb: Path, field: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), field], check=True, capture_output=True, text=True
    ).stdout.strip()


def fetch_debs(debs_dir: Path, offline: bool = False) -> dict[str, Deb]:
    debs_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, Deb] = {}
    for pkg in PACKAGES:
        cands = sorted(debs_dir.glob(f"{pkg}_*.deb"))
        if not cands:
            if offline:
                raise SystemExit(f"{pkg}: no cached .deb in {debs_dir} and --offline given")
            print(f"  apt-get download {pkg}", flush=True)
            subprocess.run(["apt-get", "download", pkg], cwd=debs_dir, check=True)
            cands = sorted(debs_dir.glob(f"{pkg}_*.deb"))
        deb = cands[-1]
        found[pkg] = Deb(pkg, _deb_field(deb, "Version"), deb)
        print(f"  {pkg} {found[pkg].version}  ({deb.name})", flush=True)
    return found


def extract_deb(deb: Path, dest: Path) -> Path:
    if not dest.exists():
        tmp = dest.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        tmp.rename(dest)
    return dest


DICTD_TITLES = {
    "wn": "WordNet 3.0 glosses (Princeton University; WordNet 3.0 licence)",
    "jargon": "The Jargon File 4.4.7 (the hacker lexicon)",
    "devil": "Ambrose Bierce, The Devil's Dictionary (1911)",
}


def read_dictd_source(pkg_root: Path, db: str) -> str:
    d = pkg_root / "usr/share/dictd"
    entries = read_dictd((d / f"{db}.index").read_bytes(), gzip.decompress((d / f"{db}.dict.dz").read_bytes()))
    if db == "wn":
        seen: set[str] = set()
        return "\n".join(t for t in (wordnet_entry_to_text(h, b, seen) for h, b in entries) if t)
    return "\n".join(t for t in (dictd_entry_to_text(h, b) for h, b in entries) if t)


def read_sources(extract: dict[str, Path]) -> Iterator[tuple[str, str, str]]:
    """Yield (source name, title, clean text) for every text of every package."""
    for name, text in read_austen(extract["r-cran-janeaustenr"]).items():
        yield f"austen-{name}", AUSTEN_BOOKS[name], text
    for pkg in SWORD_PACKAGES:
        root = extract[pkg] / "usr/share/sword"
        for conf_path in sorted((root / "mods.d").glob("*.conf")):
            conf, entries = read_sword_module(root, conf_path)
            mod = conf["__name__"]
            sep = "\n" if conf.get("Category", "").lower().startswith("comment") else " "
            yield f"sword-{mod}", conf.get("Description", mod), sword_entries_to_text(entries, sep)
    for pkg, db in DICTD_PACKAGES.items():
        yield f"dictd-{db}", DICTD_TITLES[db], read_dictd_source(extract[pkg], db)


def ood_text(text: str, max_chars: int = OOD_MAX_CHARS) -> str:
    """The out-of-domain split: whole paragraphs from the start of ``text`` up to ``max_chars``."""
    out, n = [], 0
    for p in text.split("\n"):
        if not p.strip():
            continue
        if out and n + len(p) + 1 > max_chars:
            break
        out.append(p)
        n += len(p) + 1
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--offline", action="store_true", help="only use cached .deb files")
    ap.add_argument("--build-dir", type=Path, default=BUILD)
    ap.add_argument("--no-assets", action="store_true", help="do not copy anything into src/")
    ap.add_argument(
        "--copy-splits",
        action="store_true",
        help="also copy the validation/calibration splits into src/ (default: only ood.txt is copied); do this "
        "only together with a model trained on this corpus's training split",
    )
    args = ap.parse_args(argv)

    build: Path = args.build_dir
    print("[1/4] Debian packages", flush=True)
    debs = fetch_debs(build / "debs", args.offline)
    extract = {p: extract_deb(d.path, build / "extract" / f"{p}_{d.version}") for p, d in debs.items()}

    print("[2/4] reading texts", flush=True)
    sources: dict[str, str] = {}
    meta = {}
    for name, title, text in read_sources(extract):
        sources[name] = text
        meta[name] = {"title": title, "chars": len(text), "bytes": len(text.encode())}
        print(f"  {name:28s} {len(text.encode()) / 1e6:7.2f} MB  {title}", flush=True)

    print("[3/4] chunking + splitting", flush=True)
    ood = ood_text(sources.pop(OOD_SOURCE))
    splits = assign_splits(sources)
    v1 = {n: t for n, t in sources.items() if n.startswith("austen-") or n in V1_SOURCES}
    v1_splits = assign_splits(v1)

    print("[4/4] writing", flush=True)
    summary = {
        "packages": {p: d.version for p, d in debs.items()},
        "sources": meta,
        "ood_source": OOD_SOURCE,
        "splits": {},
        "v1_splits": {},
    }
    for split, chunks in splits.items():
        text = "\n\n".join(chunks) + "\n"
        write_if_changed(build / f"{split}.txt", text)
        summary["splits"][split] = {"chunks": len(chunks), "bytes": len(text.encode())}
        print(f"  {split:12s} {len(chunks):5d} chunks {len(text.encode()) / 1e6:8.3f} MB", flush=True)
    write_if_changed(build / "ood.txt", ood)
    summary["splits"]["ood"] = {"source": OOD_SOURCE, "bytes": len(ood.encode()), "paragraphs": ood.count("\n")}
    print(f"  {'ood':12s} {OOD_SOURCE} {len(ood.encode()) / 1e6:8.3f} MB", flush=True)
    # the v1 corpus's held-out chunks (the previous default model's validation/calibration) must still be
    # held out of the v2 training split
    train = set(splits["train"])
    for split in ("validation", "calibration"):
        leaked = sum(c in train for c in v1_splits[split])
        held = set(splits[split])
        kept = sum(c in held for c in v1_splits[split])
        summary["v1_splits"][split] = {"chunks": len(v1_splits[split]), "in_v2_train": leaked,
                                       f"in_v2_{split}": kept}
        print(f"  v1 {split}: {len(v1_splits[split])} chunks, {kept} in v2 {split}, {leaked} in v2 train", flush=True)
        if leaked:
            raise SystemExit(f"v1 {split} chunks leaked into the v2 training split")
    (build / "corpus_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.no_assets:
        ASSET_DATA.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(build / "ood.txt", ASSET_DATA / "ood.txt")
        copied = ["ood"]
        if args.copy_splits:
            for split in ("validation", "calibration"):
                shutil.copyfile(build / f"{split}.txt", ASSET_DATA / f"{split}.txt")
            copied += ["validation", "calibration"]
        print(f"  copied {'/'.join(copied)} to {ASSET_DATA.relative_to(REPO)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
