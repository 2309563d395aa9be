"""Corpus-building functions of scripts/build_corpus.py on tiny synthetic inputs (no network)."""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_corpus.py"
_spec = importlib.util.spec_from_file_location("build_corpus", _SCRIPT)
bc = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("build_corpus", bc)
_spec.loader.exec_module(bc)


# --------------------------------------------------------------------------
# markup
# --------------------------------------------------------------------------


def test_strip_osis_markup():
    raw = (
        '<div type="x-milestone" subType="x-preverse" sID="pv1"/>'
        '<title type="main">Psalm 23</title> <div sID="g1" type="x-p"/>'
        '<w lemma="strong:H3068">The LORD</w> is my <w lemma="strong:H7462">shepherd</w>;'
        '<note type="crossReference"><reference osisRef="Ps.80.1">Ps 80:1</reference></note>'
        " I shall not want &amp; more.<note n=\"a\">a footnote</note>  <lb/>Next  line"
    )
    out = bc.strip_markup(raw)
    assert out == "Psalm 23\nThe LORD is my shepherd; I shall not want & more.\nNext line"
    assert "strong" not in out and "<" not in out and "footnote" not in out


def test_strip_keeps_inline_references_and_gbf():
    assert bc.strip_markup('See <reference osisRef="Gen.1.1">Ge 1:1</reference>.') == "See Ge 1:1."
    assert bc.strip_markup("In the beginning<RF>a note<Rf> God<CM>created") == "In the beginning God\ncreated"
    assert bc.strip_markup('<hi type="italic">emphasis</hi> &lt;ok&gt;') == "emphasis <ok>"
    assert bc.strip_markup('<milestone n="x"/>   ') == ""


def test_lines_to_paragraphs():
    lines = ["CHAPTER 1", "", "It is a truth", "universally acknowledged.", "", "", "Next", " para "]
    assert bc.lines_to_paragraphs(lines) == "CHAPTER 1\nIt is a truth universally acknowledged.\nNext para"


# --------------------------------------------------------------------------
# SWORD modules
# --------------------------------------------------------------------------


def _write_module(root: Path, name: str, drv: str, blocks: list[list[str]], index: list[tuple[int, int]]):
    """Write a fake SWORD module. ``index`` lists (block, entry-in-block) per verse;
    entry -1 means an empty verse."""
    data = root / "modules" / "texts" / "ztext" / name.lower()
    data.mkdir(parents=True)
    (root / "mods.d").mkdir(exist_ok=True)
    (root / "mods.d" / f"{name.lower()}.conf").write_text(
        f"[{name}]\nDataPath=./modules/texts/ztext/{name.lower()}/\nModDrv={drv}\n"
        f"Description=Fake {name}\nCategory=Biblical Texts\n"
    )
    bzs, bzz = b"", b""
    offsets = []  # per block: list of (start, size) in decompressed block
    for entries in blocks:
        raw, offs = b"", []
        for e in entries:
            b = e.encode()
            offs.append((len(raw), len(b)))
            raw += b
        comp = zlib.compress(raw)
        bzs += struct.pack("<III", len(bzz), len(comp), len(raw))
        bzz += comp
        offsets.append(offs)
    wide = drv.endswith("4")
    bzv = b""
    for blk, ent in index:
        start, size = (0, 0) if ent < 0 else offsets[blk][ent]
        bzv += struct.pack("<III" if wide else "<IIH", blk if ent >= 0 else 0, start, size)
    for suffix, content in (("s", bzs), ("z", bzz), ("v", bzv)):
        (data / f"ot.bz{suffix}").write_bytes(content)
    for suffix in "szv":  # empty NT, as in OT-only modules
        (data / f"nt.bz{suffix}").write_bytes(b"")
    return root / "mods.d" / f"{name.lower()}.conf"


@pytest.mark.parametrize("drv", ["zText", "zCom4"])
def test_read_fake_sword_module(tmp_path, drv):
    blocks = [
        ['<div type="book"/><title>Genesis</title>', "In the <w>beginning</w>.", "God said.<note>n</note>"],
        ["Second block verse.", "Last &amp; final."],
    ]
    # verse 0 empty, verses 1-3 from block 0, a linked repeat of entry 2, then block 1
    index = [(0, -1), (0, 0), (0, 1), (0, 2), (0, 2), (1, 0), (1, 1)]
    conf_path = _write_module(tmp_path, "FakeMod", drv, blocks, index)
    conf, entries = bc.read_sword_module(tmp_path, conf_path)
    assert conf["__name__"] == "FakeMod" and conf["ModDrv"] == drv
    assert len(entries) == 5  # empty verse skipped, linked duplicate kept once
    assert entries[1] == "In the <w>beginning</w>."
    text = bc.sword_entries_to_text(entries)
    assert text == "Genesis\nIn the beginning. God said. Second block verse. Last & final."


def test_sword_index_size_fallback(tmp_path):
    """A module whose conf claims zCom4 but whose index uses 10-byte records (MHCC)."""
    blocks = [["alpha", "beta", "gamma"]]
    conf_path = _write_module(tmp_path, "Mixed", "zText", blocks, [(0, 0), (0, 1), (0, 2)])
    text = conf_path.read_text().replace("ModDrv=zText", "ModDrv=zCom4")
    conf_path.write_text(text)
    _, entries = bc.read_sword_module(tmp_path, conf_path)
    assert entries == ["alpha", "beta", "gamma"]


def test_parse_sword_conf_first_value_wins(tmp_path):
    p = tmp_path / "x.conf"
    p.write_text("# comment\n[Mod]\nA=1\nA=2\nAbout=x=y\n\n")
    assert bc.parse_sword_conf(p) == {"__name__": "Mod", "A": "1", "About": "x=y"}


# --------------------------------------------------------------------------
# R lazy-load database
# --------------------------------------------------------------------------


def _i(n: int) -> bytes:
    return struct.pack(">i", n)


def _charsxp(s: str) -> bytes:
    b = s.encode()
    return _i(9 | (64 << 12)) + _i(len(b)) + b  # CHARSXP, ASCII


def _strsxp(items) -> bytes:
    return _i(16) + _i(len(items)) + b"".join(_charsxp(s) for s in items)


def _intsxp(vals) -> bytes:
    return _i(13) + _i(len(vals)) + b"".join(_i(v) for v in vals)


def _named_list(d: dict[str, bytes]) -> bytes:
    """VECSXP with a names attribute (serialised elements given as bytes)."""
    out = _i(19 | (1 << 9)) + _i(len(d)) + b"".join(d.values())
    # attribute pairlist: names = c(...)
    out += _i(2 | (1 << 10)) + _i(1) + _charsxp("names") + _strsxp(list(d)) + _i(254)
    return out


def _serialize(body: bytes) -> bytes:
    return b"X\n" + _i(3) + _i(0x040201) + _i(0x030500) + _i(5) + b"UTF-8" + body


def test_read_fake_rdb(tmp_path):
    pytest.importorskip("rdata")
    objs = {"emma": ["EMMA", "", "Emma Woodhouse, handsome,", "clever, and rich.", "", "THE END"]}
    rdb, variables = b"", {}
    for name, lines in objs.items():
        raw = _serialize(_strsxp(lines))
        rec = struct.pack(">I", len(raw)) + zlib.compress(raw)
        variables[name] = _intsxp([len(rdb), len(rec)])
        rdb += rec
    rdx = gzip.compress(_serialize(_named_list({"variables": _named_list(variables)})))
    index = bc.read_rdx_index(rdx)
    assert index == {"emma": (0, len(rdb))}
    lines = bc.read_rdb_object(rdb, *index["emma"])
    assert list(lines) == objs["emma"]
    assert bc.lines_to_paragraphs(lines) == "EMMA\nEmma Woodhouse, handsome, clever, and rich.\nTHE END"


# --------------------------------------------------------------------------
# chunking and splits
# --------------------------------------------------------------------------


def test_chunk_paragraphs_contiguous():
    paras = [f"paragraph {i} " + "x" * (i % 7) for i in range(200)]
    text = "\n".join(paras)
    chunks = bc.chunk_paragraphs(text, min_chars=300)
    assert "\n".join(chunks) == text  # contiguous, nothing lost or reordered
    assert all(len(c) + 1 >= 300 for c in chunks[:-1])  # +1: the joining newline
    assert len(chunks[-1]) >= 150


def test_split_determinism_and_proportions():
    a = [bc.split_of("src", i) for i in range(5000)]
    # the same in another interpreter with another string-hash seed: the shipped splits must be reproducible
    # (Python's hash() of a str differs between processes; a split built on it would differ here)
    code = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location('bc', {str(_SCRIPT)!r}); "
            "m = importlib.util.module_from_spec(s); sys.modules['bc'] = m; s.loader.exec_module(m); "
            "print(''.join(m.split_of('src', i)[0] for i in range(5000)))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED="12345")).stdout.strip()
    assert other == "".join(x[0] for x in a)
    assert set(a) == {"train", "validation", "calibration"}
    frac_val = a.count("validation") / len(a)
    frac_cal = a.count("calibration") / len(a)
    assert 0.005 < frac_val < 0.02 and 0.005 < frac_cal < 0.02
    sources = {"b": "\n".join(f"b{i}" * 40 for i in range(300)), "a": "\n".join(f"a{i}" * 40 for i in range(300))}
    s1 = bc.assign_splits(sources, min_chars=500)
    s2 = bc.assign_splits(dict(reversed(list(sources.items()))), min_chars=500)
    assert s1 == s2
    total = sum(len(v) for v in s1.values())
    assert total == len(bc.chunk_paragraphs(sources["a"], 500)) + len(bc.chunk_paragraphs(sources["b"], 500))


# --------------------------------------------------------------------------
# dictd databases (GCIDE, Jargon File, Devil's Dictionary) and the OOD split
# --------------------------------------------------------------------------


def _b64(n: int) -> str:
    digits = ""
    while True:
        digits = bc._B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def _fake_dictd(entries: list[tuple[list[str], str]]) -> tuple[str, bytes]:
    """(index text, .dict bytes) for entries given as (headwords sharing the body, body)."""
    data = b"00-database-info\n  meta text\n"
    lines = [f"00-database-info\t{_b64(0)}\t{_b64(len(data))}"]
    for heads, body in entries:
        raw = body.encode()
        for h in heads:
            lines.append(f"{h}\t{_b64(len(data))}\t{_b64(len(raw))}")
        data += raw
    return "\n".join(sorted(lines)) + "\n", data


def test_dictd_b64_roundtrip():
    for n in (0, 1, 63, 64, 4095, 4096, 123456789):
        assert bc.dictd_b64(_b64(n)) == n
    assert bc.dictd_b64("Bdq") == 1 * 64 * 64 + 29 * 64 + 42


def test_read_dictd_order_dedup_and_meta(tmp_path):
    index, data = _fake_dictd([(["zebra"], "ZEBRA, n. A striped horse.\n"), (["apple", "Apple"], "APPLE, n. A fruit.\n")])
    entries = bc.read_dictd(index.encode(), data)
    # file order (not index order), shared bodies once, meta entries skipped
    assert entries == [("zebra", "ZEBRA, n. A striped horse.\n"), ("Apple", "APPLE, n. A fruit.\n")]
    # a gzip'ed .dict.dz on disk reads the same way as in read_dictd_source
    d = tmp_path / "usr/share/dictd"
    d.mkdir(parents=True)
    (d / "devil.index").write_text(index)
    (d / "devil.dict.dz").write_bytes(gzip.compress(data))
    assert bc.read_dictd_source(tmp_path, "devil") == "ZEBRA, n. A striped horse.\nAPPLE, n. A fruit."


def test_wordnet_entry_to_text_dedups_synset_glosses():
    seen: set[str] = set()
    body = ("'tween\n    adv 1: in between; \"two houses with a tree between\" [syn:\n"
            "           {between}, {'tween}]\n")
    assert bc.wordnet_entry_to_text("'tween", body, seen) == "'tween: (adv) in between; \"two houses with a tree between\"."
    # the same synset's gloss under another headword is not repeated
    assert bc.wordnet_entry_to_text("between", body.replace("'tween\n", "between\n", 1), seen) == ""
    two = "bank\n    n 1: sloping land [syn: {bank}]\n    2: a financial institution\n    v 1: tip laterally\n"
    assert bc.wordnet_entry_to_text("bank", two, seen) == (
        "bank: (n) sloping land; (n) a financial institution; (v) tip laterally.")


def test_no_gpl_source_and_train_only_sources_never_held_out():
    assert "dict-gcide" not in bc.PACKAGES  # corpus v3: GCIDE (GPL-2+) is neither shipped nor trained on
    out = bc.assign_splits({"dictd-wn": "w\n" * 4000, "sword-KJV": "p\n" * 4000}, min_chars=4)
    assert not any(c.startswith("w") for s in ("validation", "calibration") for c in out[s])
    assert any(c.startswith("p") for s in ("validation", "calibration") for c in out[s])


def test_dictd_entry_to_text():
    body = (
        "dead code\n n.\n\n    Routines that can never be\n    accessed (see {software rot}).\n\n"
        "    A _second_ paragraph.\n"
    )
    assert bc.dictd_entry_to_text("dead code", body) == (
        "dead code n.\nRoutines that can never be accessed (see software rot).\nA second paragraph."
    )


def test_ood_text_whole_paragraphs():
    text = "\n".join(f"para {i} " + "x" * 20 for i in range(100))
    out = bc.ood_text(text, max_chars=100)
    assert out.endswith("\n") and len(out) <= 101
    paras = out.strip().split("\n")
    assert paras == text.split("\n")[: len(paras)] and len(paras) == 3
    assert bc.ood_text("short\npara", 1000) == "short\npara\n"


def test_ood_source_is_not_chunked_into_splits():
    assert bc.OOD_SOURCE == "dictd-devil" and bc.DICTD_PACKAGES["dict-devil"] == "devil"
    # the v1 sources and split rule are unchanged: their chunk assignment does not depend on new sources
    a = bc.assign_splits({"sword-KJV": "p\n" * 10}, min_chars=4)
    b = bc.assign_splits({"sword-KJV": "p\n" * 10, "dictd-jargon": "q\n" * 10}, min_chars=4)
    for split in a:
        assert all(c in b[split] for c in a[split])


def test_held_out_splits_interleave_sources():
    """Tools evaluate on the first N tokens of validation.txt: a prefix must mix the sources in proportion."""
    pairs = [("a", f"a{i}") for i in range(6)] + [("b", f"b{i}") for i in range(3)] + [("c", "c0")]
    out = bc.interleave(pairs)
    assert sorted(out) == sorted(pairs)  # a permutation
    for src in "abc":  # each source keeps its own order
        assert [c for s, c in out if s == src] == [c for s, c in pairs if s == src]
    assert {s for s, _ in out[:4]} == {"a", "b"} and [s for s, _ in out].index("c") <= 5
    assert bc.interleave(pairs) == out  # deterministic
    # assign_splits: train keeps source order (the trainer's data order), held-out splits are interleaved
    sources = {name: "\n".join(f"{name}{i}" * 40 for i in range(400)) for name in ("x", "y")}
    s = bc.assign_splits(sources, min_chars=300)
    train_src = [c[0] for c in s["train"]]
    assert train_src == sorted(train_src)
    for split in ("validation", "calibration"):
        pairs = [(n, c) for n in sorted(sources) for i, c in enumerate(bc.chunk_paragraphs(sources[n], 300))
                 if bc.split_of(n, i) == split]
        assert len({n for n, _ in pairs}) == 2  # both sources hold chunks out
        assert s[split] == [c for _, c in bc.interleave(pairs)] != [c for _, c in pairs]
