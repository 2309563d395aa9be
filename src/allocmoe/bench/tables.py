"""Markdown tables of a bench result: one per phase (times, spread, speed-ups beside their Amdahl limit,
unreliable ratios marked), then the token-policy overhead."""

from __future__ import annotations

from .environment import machine_busy
from .stats import iqr_over_median, policy_overhead

MARK = "⚠"  # beside a ratio flagged as unreliable (above its limit, or from widely spread repeats)
FLAG_WORDS = {"over_limit": "above the limit", "decoder_over_limit": "decoder stack above its limit",
              "wide_spread": "repeats spread wider than the threshold"}


def _f(x, fmt="{:.2f}"):
    return "—" if x is None else fmt.format(x)


def marked_ratio(ratio: float | None, limit: float | None = None, flags=(), fmt: str = "{:.2f}",
                 show_limit: bool = True) -> str:
    """"1.08 (≤ 1.20)", "2.03 ⚠ (≤ 1.20)" for a flagged ratio; "—" when there is no ratio."""
    if ratio is None:
        return "—"
    s = fmt.format(ratio) + (f" {MARK}" if flags else "")
    if show_limit and limit is not None:
        s += f" (≤ {fmt.format(limit)})"
    return s


def describe_flags(flags) -> str:
    return "; ".join(FLAG_WORDS.get(f, f) for f in flags)


def environment_line(result: dict) -> str:
    env, st = result["env"], result["settings"]
    load = ""
    if env.get("loadavg_start") or env.get("loadavg_end"):
        fmt = lambda l: f"{l[0]:.2f}" if l else "?"  # noqa: E731
        load = (f" Load average (1 min) at start / end: {fmt(env.get('loadavg_start'))} / "
                f"{fmt(env.get('loadavg_end'))} on {env.get('cpu_count')} logical CPUs"
                + (" — other processes competed for the CPU; ratios may be off." if machine_busy(env) else ".")
                )
    return (f"Model `{env['model']}` ({env['architecture']}), {env['dtype']} on {env['device']} "
            f"({env['cpu']}), {env['threads']} thread(s); torch {env['torch']}, transformers "
            f"{env['transformers']}; experts implementation `{env['experts_implementation']}`, sparse path "
            f"`{env['sparse_experts_path']}`. Medians over {st['repeats']} interleaved repeats "
            f"({st['warmup']} warm-up round(s) discarded).{load}")


def format_table(result: dict) -> str:
    """Markdown: one table per phase (time, spread, speed-ups, Amdahl), then the token-policy overhead."""
    am = result.get("amdahl", {}).get("phases", {})
    rel = result.get("reliability") or {}
    lines = [environment_line(result), ""]
    for pname, ph in result["phases"].items():
        a = am.get(pname, {})
        head = f"### {pname}: {ph['description']}"
        by = result.get("amdahl", {}).get("share_by_implementation") or {}
        if len(by) > 1:
            parts = [f"{i}: {v[pname]['f']:.3f} / {v[pname]['f_decoder']:.3f}" for i, v in by.items()
                     if pname in v and v[pname].get("f_decoder") is not None]
            head += " — routed-experts share f of the step / of the decoder stack: " + "; ".join(parts)
        elif a.get("f") is not None:
            head += (f" — routed-experts share f = {a['f']:.3f} of the step"
                     + (f", {a['f_decoder']:.3f} of the decoder stack" if a.get("f_decoder") is not None else ""))
        lines += [head, ""]
        unit = "ms/step" if ph["kind"] == "decode" else "ms"
        div = ph["tokens"] if ph["kind"] == "decode" else 1
        lines.append(f"| config | policy | act/token (measured) | median {unit} | min–max {unit} | IQR/median | "
                     "speed-up | ideal (Amdahl) | achieved/ideal | decoder speed-up | decoder ideal | "
                     "decoder achieved/ideal | speed-up of mins (achieved/ideal) |")
        lines.append("|" + "---|" * 13)
        notes = []
        for c, d in ph["configs"].items():
            meta = result["configs"][c]
            pol = meta["summary"]["policy"] if meta.get("summary") else "(unpatched)"
            if "skipped" in d:
                lines.append(f"| {c} | {pol} | | {d['skipped']} | | | | | | | | | |")
                continue
            r = a.get("configs", {}).get(c, {})
            flags = d.get("flags") or []
            ideal = r.get("ideal_speedup")
            ideal_d = r.get("ideal_decoder_speedup")
            if ideal is None and d.get("speedup_limit") is not None:  # no measured share: the A_full/A_plan bound
                ideal, ideal_d = d["speedup_limit"], d.get("decoder_speedup_limit")
            iqr = d.get("iqr_pct", 100 * iqr_over_median(d.get("times_s") or []))  # older results: from the times
            step_flags = [f for f in flags if f != "decoder_over_limit"]
            dec_flags = [f for f in flags if f != "over_limit"]
            lines.append(
                f"| {c} | {pol} | {_f(d['activations_per_token'])} | {1e3 * d['median_s'] / div:.1f} | "
                f"{1e3 * d['min_s'] / div:.1f}–{1e3 * d['max_s'] / div:.1f} | {_f(iqr, '{:.1f}%')} | "
                f"{marked_ratio(d.get('speedup'), None, step_flags, '{:.3f}')} | "
                f"{_f(ideal, '{:.3f}')}{'' if r or ideal is None else ' (f=1)'} | "
                f"{_f(r.get('achieved_over_ideal'), '{:.1%}')} | "
                f"{marked_ratio(d.get('decoder_speedup'), None, dec_flags, '{:.3f}')} | "
                f"{_f(ideal_d, '{:.3f}')} | "
                f"{_f(r.get('decoder_achieved_over_ideal'), '{:.1%}')} | {_f(d.get('speedup_of_mins'), '{:.3f}')}"
                + (f" ({r['achieved_over_ideal_of_mins']:.1%})" if r.get("achieved_over_ideal_of_mins") else "") + " |")
            if flags:
                notes.append(f"{c}: {describe_flags(flags)}")
        lines.append("")
        if notes:
            again = " (still, after re-measuring this phase once)" if ph.get("remeasured") else ""
            lines += [f"{MARK} unreliable{again}: " + "; ".join(notes) + f" ({rel.get('rule', '')}).", ""]
        elif ph.get("remeasured"):
            lines += ["Re-measured once (a ratio of the first attempt was flagged); no ratio is flagged now.", ""]
    ov = result.get("amdahl", {}).get("token_policy_overhead") or policy_overhead(result)
    if ov:
        lines += ["### Token-policy overhead vs the fixed plan with the same per-layer k", "",
                  "| policy plan | phase | fixed plan | act/token policy / fixed | time overhead | "
                  "at equal activations | decoder overhead | decoder at equal activations | overhead of mins |",
                  "|" + "---|" * 9]
        for c, per in ov.items():
            for pname, r in per.items():
                lines.append(
                    f"| {c} | {pname} | {r['fixed']} | {_f(r['activations_policy'])} / {_f(r['activations_fixed'])} | "
                    f"{r['raw_pct']:+.1f}% | {_f(r.get('at_equal_activations_pct'), '{:+.1f}%')} | "
                    f"{r['decoder_raw_pct']:+.1f}% | {_f(r.get('decoder_at_equal_activations_pct'), '{:+.1f}%')} | "
                    f"{r['raw_of_mins_pct']:+.1f}% |")
        lines.append("")
    return "\n".join(lines)
