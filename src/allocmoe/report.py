"""Turning results into something a practitioner reads: markdown tables and plots (matplotlib, Agg)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_write_bytes, atomic_write_text  # noqa: E402


def _save_fig(fig, path: Path) -> None:
    buf = io.BytesIO()
    # fixed metadata so the same results give the same bytes
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def sensitivity_heatmap(profile: dict, path: Path, plans: dict[str, list[int]] | None = None, title: str = "") -> None:
    """Heat-map of S[l][k] (log scale), optionally with per-layer K of plans drawn on top."""
    import numpy as np

    S = np.array(profile["sensitivity"], dtype=float)
    ks = profile["k_values"]
    L = S.shape[0]
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(ks), 1.2 + 0.45 * L))
    pos = S[S > 0]
    floor = pos.min() if pos.size else 1e-12
    im = ax.imshow(np.log10(np.maximum(S, floor)), aspect="auto", cmap="viridis_r")
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_yticks(range(L), [str(i) for i in range(L)])
    ax.set_xlabel("experts per token k")
    ax.set_ylabel("MoE layer")
    fig.colorbar(im, ax=ax, label=f"log10 sensitivity ({profile.get('metric', '?')})")
    markers = "o^sDv<>"
    for i, (name, alloc) in enumerate((plans or {}).items()):
        ax.plot([ks.index(k) for k in alloc], range(L), marker=markers[i % len(markers)], lw=1.5,
                label=name, color=plt.cm.autumn(i / max(1, len(plans) - 1)))
    if plans:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.25, 1))
    ax.set_title(title or "Per-layer sensitivity (lower is better)", fontsize=9)
    _save_fig(fig, path)


def frontier_plot(results: dict, path: Path) -> None:
    """Validation perplexity vs measured activations per token, one line per method, full model marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[tuple[float, float]]] = {}
    for r in results["configs"]:
        if r["method"] == "full":
            continue
        by_method.setdefault(r["label"], []).append((r["activations_per_token"], r["perplexity"]))
    for label, pts in sorted(by_method.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, lw=1.2, label=label)
    full = next(r for r in results["configs"] if r["method"] == "full")
    ax.plot([full["activations_per_token"]], [full["perplexity"]], marker="*", ms=14, color="black",
            ls="none", label="full model")
    ax.set_xlabel("measured expert activations per token (all MoE layers)")
    ax.set_ylabel("validation perplexity")
    ys = [r["perplexity"] for r in results["configs"]]
    if max(ys) / min(ys) > 3:  # log scale only when the spread is wide enough to need it
        ax.set_yscale("log")
    ax.ticklabel_format(axis="y", style="plain", useOffset=False) if ax.get_yscale() == "linear" else None
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Budget-quality frontier: {results['model']['architecture']}", fontsize=10)
    _save_fig(fig, path)


def _fmt(x, nd=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}f}"


def _speed_cell(sp: dict, phase: str) -> str:
    """A measured speed-up beside its Amdahl limit, marked ⚠ when flagged as unreliable ("-" if not measured)."""
    from .bench.tables import marked_ratio

    if sp.get(f"{phase}_speedup") is None:
        return "-"
    return marked_ratio(sp[f"{phase}_speedup"], sp.get(f"{phase}_limit"), sp.get(f"{phase}_flags") or ())


def _flagged_speeds(results: dict) -> list[str]:
    from .bench.tables import describe_flags

    out = []
    for r in results["configs"]:
        sp = r.get("speed") or {}
        for phase in ("prefill", "decode"):
            if sp.get(f"{phase}_flags"):
                out.append(f"{r['label']} at budget {r.get('budget')}, {phase}: "
                           f"{_fmt(sp.get(f'{phase}_speedup'), 2)}x vs a limit of "
                           f"{_fmt(sp.get(f'{phase}_limit'), 2)}x "
                           f"({describe_flags(sp[f'{phase}_flags'])})")
    return out


def _comp_cell(r: dict) -> str:
    """Compensation work measured on the validation pass, in expert-activation equivalents ("-" if none)."""
    c = r.get("compensation")
    return "-" if not c else f"+{c['expert_pair_equivalents_per_token']:.2f}"


def _recovered(ppl: float, uniform: float, full: float) -> str:
    return f"{100 * (uniform - ppl) / (uniform - full):.0f}%" if uniform > full else "-"


# which levers a configuration of the main job uses (derived from how its plan was made)
def _levers(r: dict) -> dict:
    return {"Alloc-L": r["method"] in ("dp", "greedy", "search"), "Alloc-T": r["policy"] == "global",
            "comp": bool(r.get("compensated")), "search": r["method"] == "search",
            "policy-aware": r.get("profile_policy", "fixed") != "fixed"}


def ablation_table(results: dict) -> list[str]:
    """Each lever alone and combined at the ablation budget, with the share of uniform's loss recovered."""
    b = results["settings"].get("ablation_budget")
    full = next(r for r in results["configs"] if r["method"] == "full")
    rows = [r for r in results["configs"] if r.get("budget") == b and r["policy"] in ("fixed", "global")
            and r["method"] in ("uniform", "dp", "search")]
    uni = next((r for r in rows if r["method"] == "uniform" and r["policy"] == "fixed"
                and not r.get("compensated")), None)
    if b is None or uni is None or len(rows) < 3:
        return []
    has_ood = "ood" in full and "ood" in uni
    names = ("Alloc-L", "Alloc-T", "comp", "search", "policy-aware")
    head = ("| configuration | " + " | ".join(names) + " | act/tok | comp (act. equiv.) | val ppl | recovered |"
            + " OOD ppl | OOD recovered |" * has_ood)
    lines = [f"## Ablation at budget {b}: each lever alone and combined", "",
             "`recovered` is the share of the perplexity uniform top-k loses (vs the full model) that the "
             "configuration wins back, at equal measured activations; `comp` is the compensation's measured "
             "work in units of expert activations of the same layer.", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    rows.sort(key=lambda r: (sum(_levers(r).values()), r["perplexity"]))
    for r in rows:
        lv = _levers(r)
        row = (f"| {r['label']} | " + " | ".join("x" if lv[n] else "" for n in names)
               + f" | {_fmt(r['activations_per_token'], 2)} | {_comp_cell(r)} | {_fmt(r['perplexity'])} | "
               f"{_recovered(r['perplexity'], uni['perplexity'], full['perplexity'])} |")
        if has_ood:
            o = (r.get("ood") or {}).get("perplexity")
            row += (f" {_fmt(o)} | {_recovered(o, uni['ood']['perplexity'], full['ood']['perplexity'])} |"
                    if o else " - | - |")
        lines.append(row)
    return lines + [""]


def sensitivity_table(results: dict) -> list[str]:
    """Alloc-L's input, one row per MoE layer: the profile's cost of that layer at each k, and the spread between
    the most and the least sensitive layer. Full-K profile (every other layer at full K): the cost at the k
    nearest half K. Operating-point profile: what the DP trades, the gain of one activation more in layer l,
    S[l][a_l] - S[l][a_l + 1] around the allocation a (S[l][a_l] itself is the whole allocation's KL, the same
    for every layer, so it says nothing about layer l)."""
    prof = results.get("profile") or {}
    S, ks = prof.get("sensitivity"), prof.get("k_values")
    if not S or not ks:
        return []
    top = (results.get("model") or {}).get("top_k") or max(ks)
    shown = [k for k in ks if k < top]
    op = prof.get("operating_point") or {"at": "full"}
    around = op.get("around") if op.get("at") != "full" else None
    if around and all(a in ks and a + 1 in ks for a in around):
        col = [row[ks.index(a)] - row[ks.index(a + 1)] for row, a in zip(S, around)]
        what = "Gain of one activation more (S[l][a] - S[l][a+1], a: the layer's k in the allocation)"
        where = f"every other layer at budget {op.get('at')}'s allocation {around}"
    else:
        half = min(shown or ks, key=lambda k: abs(k - top / 2))
        col = [row[ks.index(half)] for row in S]
        what = f"Cost at k={half}"
        where = ("every other layer at full K" if around is None else
                 f"every other layer at budget {op.get('at')}'s allocation {around}")
    lines = [f"## Per-layer sensitivity (the profile: {prof.get('metric')} of one layer at top-k, {where}; "
             f"{prof.get('tokens', 0):,} calibration tokens)", ""]
    spread = (f"spread **{max(col) / min(col):.1f}x**" if min(col) > 0 else
              "spread undefined (the least sensitive layer's cost is not above 0: within measurement noise)")
    lines += [f"{what}: most sensitive MoE layer {col.index(max(col))} ({max(col):.3g}), "
              f"least {col.index(min(col))} ({min(col):.3g}), {spread}.", ""]
    head = "| MoE layer |" + "".join(f" k={k} |" for k in shown)
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    lines += [f"| {i} |" + "".join(f" {row[ks.index(k)]:.3g} |" for k in shown) for i, row in enumerate(S)]
    return lines + [""]


def _label(r: dict) -> str:
    """The configuration's name; where the plan guard (guard.py) replaced the method's allocation, by which."""
    g = r.get("guard")
    return r["label"] if g in (None, "candidate") else f"{r['label']} (guard: {g})"


def _paired_windows(rows: list[dict], key: str | None = None):
    """(window tokens, per-row window NLLs) when every row was scored on the same windows, else None."""
    data = [r if key is None else (r.get(key) or {}) for r in rows]
    if not data or any("window_nll" not in d or "window_tokens" not in d for d in data):
        return None
    toks = data[0]["window_tokens"]
    if len(toks) < 2 or any(d["window_tokens"] != toks for d in data):
        return None
    return toks, [d["window_nll"] for d in data]


def _vs_uniform(rows: list[dict], u: int, key: str | None = None) -> list[str]:
    """Each row's Δppl against row `u` (uniform) with its paired-bootstrap interval; ≈ where it contains 0."""
    from .uncertainty import Bootstrap

    paired = _paired_windows(rows, key)
    if paired is None:
        return []
    toks, nlls = paired
    bs = Bootstrap(toks)
    cells = []
    for i, v in enumerate(nlls):
        if i == u:
            cells.append("(reference)")
            continue
        iv = bs.relative(nlls[u], v)
        cells.append(f"{100 * iv['delta']:+.1f}% [{100 * iv['low']:+.1f}, {100 * iv['high']:+.1f}]"
                     + ("" if iv["resolved"] else " ≈"))
    return cells


def _uncertainty(rows: list[dict]) -> tuple[list[str], list[str], list[str], str]:
    """A budget table's ranks (only orders the validation windows resolve; "=" marks a shared rank), its
    Δ-vs-uniform cells (validation, OOD) and the note explaining them; plain ranks without window data."""
    from .uncertainty import LEVEL, RESAMPLES, resolved_ranks

    paired = _paired_windows(rows)
    u = next((i for i, r in enumerate(rows) if r.get("method") == "uniform" and r.get("policy", "fixed") == "fixed"
              and not r.get("compensated")), None)
    if paired is None:
        return [str(i) for i in range(1, len(rows) + 1)], [], [], ""
    ranks = resolved_ranks(paired[1], paired[0])
    shown = [("=" if ranks.count(k) > 1 else "") + str(k) for k in ranks]
    vs_val = _vs_uniform(rows, u) if u is not None else []
    vs_ood = _vs_uniform(rows, u, "ood") if u is not None else []
    note = (f"Uncertainty: every configuration is scored on the same {len(paired[0])} validation windows; "
            f"`Δ vs uniform` is the perplexity relative to uniform top-k with its {LEVEL:.0%} paired-bootstrap "
            f"interval over windows ({RESAMPLES} seeded resamples), ≈ marking a difference the interval does not "
            f"resolve (it contains 0). `rank` is 1 + the number of configurations with a resolved lower validation "
            f"perplexity, so configurations the data cannot tell apart share a rank (=).")
    return shown, vs_val, vs_ood, note


def markdown_report(results: dict) -> str:
    m, s = results["model"], results["settings"]
    full = next(r for r in results["configs"] if r["method"] == "full")
    # tasks at chance for the full model (evaluation.above_chance) were not scored for the other configurations
    task_names = sorted(t for t in full.get("tasks", {}) if all(t in r.get("tasks", {}) for r in results["configs"]))
    at_chance = sorted(set(full.get("tasks", {})) - set(task_names))
    lines = [
        f"# allocmoe report: {m['architecture']}",
        "",
        f"- model: `{m.get('path')}` — {m['moe_layers']} MoE layers, {m['num_experts']} routed experts, "
        f"top-{m['top_k']}, {m['shared_experts']} shared; {m['activations_per_token']} activations/token at full budget",
        f"- profile: metric `{s['metric']}`, {s['calibration_tokens']:,} calibration tokens, "
        f"{s['profile_seconds']:.1f} s (cached)",
        f"- validation: {full['tokens']:,} tokens of `{', '.join(Path(p).name for p in s['validation_files'])}`, "
        f"windows of {s['seq_len']}; tasks: {', '.join(task_names) or 'none'}",
        "- `act/tok` is **measured**: (token, expert) pairs the patched model executed during the validation "
        "pass, divided by real tokens. Δppl is relative to the full model.",
        *([f"- out-of-domain (OOD): {full['ood']['tokens']:,} tokens of "
           f"`{', '.join(Path(p).name for p in s.get('ood_files', []))}`, a style absent from the calibration text"]
          if "ood" in full else []),
        f"- full model: perplexity {_fmt(full['perplexity'])}, bits/byte {_fmt(full['bits_per_byte'], 4)}"
        + "".join(f", {t} acc {_fmt(full['tasks'][t]['accuracy'])}" for t in task_names),
        *([f"- left out (the full model scores them at chance, within 2 binomial standard errors, so they cannot "
           "show what a budget costs): " + ", ".join(
               f"{t} (acc {_fmt(full['tasks'][t]['accuracy'])}, chance {_fmt(full['tasks'][t]['chance'])}, "
               f"n {full['tasks'][t]['n']})" for t in at_chance)] if at_chance else []),
        "",
    ]
    for b in s["budgets"]:
        rows = [r for r in results["configs"] if r.get("budget") == b]
        rows.sort(key=lambda r: r["perplexity"])
        lines += [f"## Budget {b} of the original", ""]
        has_ood = "ood" in full
        ranks, vs_val, vs_ood, note = _uncertainty(rows)
        lines += [note, ""] if note else []
        head = ("| rank | method | act/tok | val ppl | Δppl |" + " Δ vs uniform (95% CI) |" * bool(vs_val)
                + " bits/byte |" + " OOD ppl | OOD Δppl |" * has_ood + " OOD Δ vs uniform (95% CI) |" * bool(vs_ood))
        head += "".join(f" {t} acc |" for t in task_names)
        head += " comp (act. equiv.) | prefill x (limit) | decode x (limit) | per-layer k |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for i, r in enumerate(rows):
            sp = r.get("speed") or {}
            row = (f"| {ranks[i]} | {_label(r)} | {_fmt(r['activations_per_token'], 2)} | {_fmt(r['perplexity'])} | "
                   f"{100 * (r['perplexity'] / full['perplexity'] - 1):+.1f}% |" + (f" {vs_val[i]} |" if vs_val else "")
                   + f" {_fmt(r['bits_per_byte'], 4)} |")
            if has_ood:
                o = r.get("ood") or {}
                row += (f" {_fmt(o.get('perplexity'))} | "
                        f"{100 * (o['perplexity'] / full['ood']['perplexity'] - 1):+.1f}% |" if o else " - | - |")
                row += f" {vs_ood[i]} |" if vs_ood else ""
            row += "".join(f" {_fmt(r['tasks'][t]['accuracy'])} |" for t in task_names)
            row += f" {_comp_cell(r)} | {_speed_cell(sp, 'prefill')} | {_speed_cell(sp, 'decode')} | {r['ks']} |"
            lines.append(row)
        lines.append("")
    lines += ablation_table(results)
    lines += sensitivity_table(results)
    if results.get("speed_note"):
        lines += ["## Speed", "", results["speed_note"], ""]
        flagged = _flagged_speeds(results)
        if flagged:
            lines += ["Unreliable speed-ups (⚠):", ""] + [f"- {f}" for f in flagged] + [""]
    lines += ["## Files", "", "- `results.json`: every number above and more (per-layer measured activations, "
              "task details counts, plans)", "- `frontier.png`, `allocation.png`, the profiles (`profile_at_<budget>.json` or `profile.json`), `plans/`", ""]
    return "\n".join(lines)


def write_report(results: dict, out_dir: Path) -> None:
    atomic_write_text(out_dir / "report.md", markdown_report(results))
    frontier_plot(results, out_dir / "frontier.png")
