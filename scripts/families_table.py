"""Both built-in families side by side (docs/results.md): the same methods, budgets and splits, from two
`allocmoe run` output directories.

    .venv/bin/python scripts/families_table.py --run deepseek-v2=runs/default --run qwen3-moe=runs/qwen3-moe

For every budget and configuration: each family's validation and out-of-domain perplexity relative to uniform
at the same budget, with its 95% paired-bootstrap interval over that run's evaluation windows (≈: the interval
contains 0), and uniform's own cost against the full model. Then each family's per-layer sensitivity at each
budget's operating point (the cost of one activation fewer in each layer, the quantity the DP trades) and its
spread. Prints markdown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from allocmoe.report import sensitivity_table
from allocmoe.uncertainty import paired_interval


def _cell(base: dict, row: dict) -> str:
    if not base.get("window_nll") or base.get("window_tokens") != row.get("window_tokens"):
        return "-"
    iv = paired_interval(base["window_nll"], row["window_nll"], base["window_tokens"])
    return (f"{100 * iv['delta']:+.1f}% [{100 * iv['low']:+.1f}, {100 * iv['high']:+.1f}]"
            + ("" if iv["resolved"] else " ≈"))


def side_by_side(runs: dict[str, dict]) -> list[str]:
    names = list(runs)
    budgets = sorted({c["budget"] for r in runs.values() for c in r["configs"] if c["method"] != "full"})
    head = "| budget | configuration |" + "".join(f" {n} val Δ vs uniform | {n} OOD Δ vs uniform |" for n in names)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for b in budgets:
        per = {n: {c["label"]: c for c in r["configs"] if c["budget"] == b} for n, r in runs.items()}
        labels = [lab for lab in per[names[0]] if all(lab in per[n] for n in names)]
        full = {n: next(c for c in r["configs"] if c["method"] == "full") for n, r in runs.items()}
        cells = []
        for n in names:
            u = per[n]["uniform"]
            cells += [f"uniform: {100 * (u['perplexity'] / full[n]['perplexity'] - 1):+.1f}% vs full",
                      f"uniform: {100 * (u['ood']['perplexity'] / full[n]['ood']['perplexity'] - 1):+.1f}% vs full"
                      if "ood" in u else "-"]
        lines.append(f"| {b:g} | uniform (vs the full model) |" + "".join(f" {c} |" for c in cells))
        for lab in labels:
            if lab == "uniform":
                continue
            cells = []
            for n in names:
                c, u = per[n][lab], per[n]["uniform"]
                guard = c.get("guard")
                mark = "" if guard in (None, "candidate") else f" (guard: {guard})"
                cells += [_cell(u, c) + mark, _cell(u.get("ood") or {}, c.get("ood") or {})]
            lines.append(f"| {b:g} | {lab} |" + "".join(f" {x} |" for x in cells))
    return lines


def sensitivity(runs: dict[str, Path]) -> list[str]:
    lines = []
    for n, d in runs.items():
        model = json.loads((d / "results.json").read_text())["model"]
        for f in sorted(d.glob("profile_at_*.json")):
            prof = json.loads(f.read_text())
            text = sensitivity_table({"model": model, "profile": prof})
            summary = next((t for t in text if "spread" in t), "")
            lines.append(f"- **{n}**, budget {prof['operating_point']['at']}: {summary}")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="NAME=DIR (an `allocmoe run` output directory)")
    a = ap.parse_args(argv)
    dirs = {}
    for spec in a.run:
        name, _, d = spec.partition("=")
        if not d:
            ap.error(f"--run takes NAME=DIR, got {spec!r}")
        dirs[name] = Path(d)
    runs = {n: json.loads((d / "results.json").read_text()) for n, d in dirs.items()}
    print("\n".join(side_by_side(runs) + [""] + sensitivity(dirs)))


if __name__ == "__main__":
    main()
