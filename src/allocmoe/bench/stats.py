"""Statistics over measured times: summaries, speed-up ratios, the Amdahl limit, token-policy overhead, and
the flags that mark a ratio as unreliable. Pure functions over numbers and result dicts (no torch).

A ratio is flagged when
- it exceeds its limit by more than `tolerance` (default 5%): "over_limit" (whole step) or
  "decoder_over_limit" (decoder stack). The limit is Amdahl's ideal speed-up
  1 / ((1 - f) + f * A_plan / A_full) with the measured share f of the step in routed experts; when f was
  not measured, the bound with f = 1, A_full / A_plan (no plan can beat it by cutting expert work alone);
- the spread of its repeats is too wide: "wide_spread" when IQR / median of the plan's or of its reference's
  times exceeds `max_spread` (default 10%).
On a machine where another process competes for the CPU both happen (the issue that motivated this:
uniform at 50% reported as 2.03x prefill where the limit is about 1.2x).
"""

from __future__ import annotations

import statistics

from ..errors import SettingsError

LIMIT_TOLERANCE = 0.05  # a ratio more than 5% above its limit is flagged
MAX_SPREAD = 0.10  # IQR / median of a config's repeats above 10% is flagged
FLAG_RULE = ("flagged: speed-up more than {tol:.0%} above its limit (Amdahl with the measured expert share f, "
             "else A_full / A_plan), or repeats of the plan or its reference spread wider than IQR/median "
             "{spread:.0%}")


def iqr_over_median(times: list[float]) -> float:
    """Interquartile range / median of `times` (0 for fewer than two values)."""
    if len(times) < 2:
        return 0.0
    med = statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return (q3 - q1) / med if med else 0.0


def summary(times: list[float]) -> dict:
    """median_s, min_s, max_s, spread_pct ((max - min) / median) and iqr_pct (IQR / median), in %."""
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "max_s": max(times),
            "spread_pct": 100.0 * (max(times) - min(times)) / med if med else 0.0,
            "iqr_pct": 100.0 * iqr_over_median(times)}


def ideal_speedup(f: float, a_plan: float, a_full: float) -> float:
    """Amdahl: a share f of the time scales with activations, which fall from a_full to a_plan."""
    if a_full <= 0:
        raise SettingsError("a_full must be positive", param="a_full")
    return 1.0 / ((1.0 - f) + f * a_plan / a_full)


def add_ratios(configs: dict, refs: dict[str, str], first: str) -> None:
    """Speed-ups of every timed config in `configs` ({name: summary dict}) against its reference (refs[name]),
    in place: speedup, decoder_speedup, speedup_of_mins, decoder_speedup_of_mins, activation_fraction, and
    vs_reference_full (against `first`) when the reference is another config."""
    head = configs.get(first, {})
    for name, d in configs.items():
        if "median_s" not in d:
            continue
        ref = configs.get(refs.get(name, first), {})
        if "median_s" in ref:
            d["speedup"] = ref["median_s"] / d["median_s"]
            d["decoder_speedup"] = (ref["decoder_median_s"] / d["decoder_median_s"]) if d["decoder_median_s"] else None
            # ratio of the fastest runs: other processes on a shared machine only ever add time
            d["speedup_of_mins"] = ref["min_s"] / d["min_s"]
            d["decoder_speedup_of_mins"] = (ref["decoder_min_s"] / d["decoder_min_s"]) if d["decoder_min_s"] else None
            a_full = ref.get("activations_per_token")
            if a_full and d.get("activations_per_token") is not None:
                d["activation_fraction"] = d["activations_per_token"] / a_full
        if refs.get(name, first) != first and "median_s" in head:
            d["vs_reference_full"] = head["median_s"] / d["median_s"]


# --------------------------------------------------------------------------------------------------
# Amdahl
# --------------------------------------------------------------------------------------------------

AMDAHL_METHOD = ("forward pre/post hooks with time.perf_counter on every routed experts module of the full "
                 "(unpatched) model; f = experts time / step time, f_decoder = experts time / decoder-stack time; "
                 "ideal = 1 / ((1 - f) + f * A_plan / A_full) with measured A")


def share_for(share: dict, impl: str | None, phase: str) -> dict | None:
    """share is {phase: {...}} (one implementation) or {"by_implementation": {impl: {phase: {...}}}}."""
    if "by_implementation" in share:
        by = share["by_implementation"]
        sub = by.get(impl) or by.get(share.get("default")) or next(iter(by.values()))
        return sub.get(phase)
    return share.get(phase)


def amdahl_analysis(result: dict, share: dict, *, measured: bool) -> dict:
    """Ideal (Amdahl) vs achieved speed-up of every config of `result`, per phase, from the expert share."""
    ref_name = result["reference"]
    default_impl = result["env"].get("experts_implementation")
    out = {"method": AMDAHL_METHOD, "measured": measured, "phases": {}}
    if "by_implementation" in share:
        out["share_by_implementation"] = share["by_implementation"]
    for pname, ph in result["phases"].items():
        rows = {}
        for c, d in ph["configs"].items():
            if "skipped" in d or "speedup" not in d:
                continue
            meta = result["configs"][c]
            sh = share_for(share, meta.get("experts_implementation"), pname)
            ref = ph["configs"].get(meta.get("reference", ref_name), {})
            a_full, a_plan = ref.get("activations_per_token"), d.get("activations_per_token")
            if sh is None or not a_full or a_plan is None:
                continue
            f, fd = sh["f"], sh.get("f_decoder")
            ideal = ideal_speedup(f, a_plan, a_full)
            row = {"f": f, "activations_per_token": a_plan, "activations_full": a_full, "ideal_speedup": ideal,
                   "achieved_speedup": d["speedup"], "achieved_over_ideal": d["speedup"] / ideal}
            if d.get("speedup_of_mins"):
                row["achieved_over_ideal_of_mins"] = d["speedup_of_mins"] / ideal
            if fd is not None and d.get("decoder_speedup"):
                ideal_d = ideal_speedup(fd, a_plan, a_full)
                row.update(f_decoder=fd, ideal_decoder_speedup=ideal_d, achieved_decoder_speedup=d["decoder_speedup"],
                           decoder_achieved_over_ideal=d["decoder_speedup"] / ideal_d)
                if d.get("decoder_speedup_of_mins"):
                    row["decoder_achieved_over_ideal_of_mins"] = d["decoder_speedup_of_mins"] / ideal_d
            rows[c] = row
        sh = share_for(share, default_impl, pname) or {}
        entry = {**sh, "configs": rows}
        full = ph["configs"].get(ref_name, {})
        if measured and "median_s" in full and "hooked_median_s" in sh:
            entry["hook_overhead_pct"] = 100.0 * (sh["hooked_median_s"] / full["median_s"] - 1.0)
        out["phases"][pname] = entry
    out["token_policy_overhead"] = policy_overhead(result, share)
    return out


def policy_overhead(result: dict, share: dict | None = None) -> dict:
    """Time of each token-policy plan relative to a fixed plan with the same per-layer k, per phase.

    raw: t_policy / t_fixed - 1. at_equal_activations: the fixed plan's time is first moved to the
    policy's measured activations with the Amdahl model (share f of the phase), which matters for
    policies whose measured activations differ from the plan (threshold, top-p, naee).
    """
    out = {}
    cfgs = result["configs"]
    for c, meta in cfgs.items():
        s = meta.get("summary")
        if not s or s["policy"] == "fixed":
            continue
        impl, sparse = meta.get("experts_implementation"), meta.get("sparse_path")
        fixed = [f for f, m in cfgs.items() if m.get("summary") and m["summary"]["policy"] == "fixed"
                 and m["summary"]["ks"] == s["ks"] and m.get("experts_implementation") == impl]
        fixed.sort(key=lambda f: cfgs[f].get("sparse_path") != sparse)
        if not fixed:
            continue
        fx = fixed[0]
        per_phase = {}
        for pname, ph in result["phases"].items():
            a, b = ph["configs"].get(c, {}), ph["configs"].get(fx, {})
            if "median_s" not in a or "median_s" not in b:
                continue
            row = {"fixed": fx, "raw_pct": 100.0 * (a["median_s"] / b["median_s"] - 1.0),
                   "decoder_raw_pct": 100.0 * (a["decoder_median_s"] / b["decoder_median_s"] - 1.0),
                   "raw_of_mins_pct": 100.0 * (a["min_s"] / b["min_s"] - 1.0),
                   "activations_policy": a["activations_per_token"], "activations_fixed": b["activations_per_token"]}
            ref = ph["configs"].get(meta.get("reference", result["reference"]), {})
            a_full = ref.get("activations_per_token")
            sh = share_for(share, impl, pname) if share else None
            if sh and a_full:
                for key, fk, tk in (("at_equal_activations_pct", "f", "median_s"),
                                    ("decoder_at_equal_activations_pct", "f_decoder", "decoder_median_s"),
                                    ("of_mins_at_equal_activations_pct", "f", "min_s")):
                    f = sh.get(fk)
                    if f is None:
                        continue
                    scale = ((1 - f) + f * a["activations_per_token"] / a_full) / \
                            ((1 - f) + f * b["activations_per_token"] / a_full)
                    row[key] = 100.0 * (a[tk] / (b[tk] * scale) - 1.0)
            per_phase[pname] = row
        out[c] = per_phase
    return out


# --------------------------------------------------------------------------------------------------
# reliability flags
# --------------------------------------------------------------------------------------------------


def ratio_flags(ratio: float | None, limit: float | None, times: list[float], ref_times: list[float], *,
                tolerance: float = LIMIT_TOLERANCE, max_spread: float = MAX_SPREAD,
                decoder_ratio: float | None = None, decoder_limit: float | None = None) -> list[str]:
    """Why a measured speed-up `ratio` (reference median / plan median) should not be trusted; [] if none.

    "over_limit": ratio > limit * (1 + tolerance); "decoder_over_limit": the same for the decoder stack;
    "wide_spread": IQR / median of `times` (the plan's repeats) or `ref_times` (its reference's) > max_spread.
    """
    flags = []
    if ratio is not None and limit is not None and ratio > limit * (1.0 + tolerance):
        flags.append("over_limit")
    if decoder_ratio is not None and decoder_limit is not None and decoder_ratio > decoder_limit * (1.0 + tolerance):
        flags.append("decoder_over_limit")
    if max(iqr_over_median(times), iqr_over_median(ref_times)) > max_spread:
        flags.append("wide_spread")
    return flags


def flag_ratios(result: dict, *, tolerance: float = LIMIT_TOLERANCE, max_spread: float = MAX_SPREAD) -> dict:
    """Add the limit and the reliability flags to every speed-up of `result`, in place; returns
    result["reliability"] ({"tolerance", "max_spread", "rule", "flagged": {phase: {config: flags}}, ...}).

    Per timed config (not its own reference): speedup_limit and decoder_speedup_limit (from
    result["amdahl"] where measured, else A_full / A_plan), limit_source ("amdahl" | "activations"),
    flags (list) and reliable (bool).
    """
    am = (result.get("amdahl") or {}).get("phases", {})
    flagged: dict = {}
    for pname, ph in result["phases"].items():
        rows = am.get(pname, {}).get("configs", {})
        for c, d in ph["configs"].items():
            if "speedup" not in d:
                continue
            ref_name = result["configs"][c].get("reference", result["reference"])
            if ref_name == c:
                continue
            ref = ph["configs"][ref_name]
            r = rows.get(c)
            if r is not None:
                limit, dlimit, source = r["ideal_speedup"], r.get("ideal_decoder_speedup"), "amdahl"
            elif d.get("activation_fraction"):
                limit = dlimit = 1.0 / d["activation_fraction"]
                source = "activations"
            else:
                limit = dlimit = source = None
            flags = ratio_flags(d["speedup"], limit, d["times_s"], ref["times_s"], tolerance=tolerance,
                                max_spread=max_spread, decoder_ratio=d.get("decoder_speedup"), decoder_limit=dlimit)
            d.update(speedup_limit=limit, decoder_speedup_limit=dlimit, limit_source=source, flags=flags,
                     reliable=not flags)
            if flags:
                flagged.setdefault(pname, {})[c] = flags
    prev = result.get("reliability") or {}
    rel = {"tolerance": tolerance, "max_spread": max_spread,
           "rule": FLAG_RULE.format(tol=tolerance, spread=max_spread),
           "flagged": flagged, "remeasured": prev.get("remeasured", [])}
    result["reliability"] = rel
    return rel


def flagged_phases(result: dict) -> list[str]:
    return list((result.get("reliability") or {}).get("flagged", {}))
