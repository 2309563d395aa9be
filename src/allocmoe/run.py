"""The main job: profile -> allocate every method at several budgets -> evaluate -> benchmark -> report.

    allocmoe run --out runs/demo                       # built-in model, budgets 0.25, 0.5, 0.75

Every configuration is evaluated with the plan applied, and its activations per token are the counts
the patched model executed during the validation pass (never the plan's arithmetic).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from . import __version__
from .adapters import find_moe_layers
from .apply import apply
from .data import builtin_text, read_texts, token_windows
from .errors import OutputExistsError
from .evaluate import perplexity, score_task
from .io import atomic_write_json
from .models import load_model, local_path
from .plan import Plan, full_plan
from .planning import allocate
from .profile import profile as run_profile
from .report import sensitivity_heatmap, write_report

console = Console(stderr=True)

# (label, allocation method, token policy); "full" is added separately
METHODS = [
    ("uniform", "uniform", "fixed"),
    ("random", "random", "fixed"),
    ("top-p", "uniform", "top-p"),
    ("naee", "uniform", "naee"),
    ("lexi", "lexi", "fixed"),
    ("greedy", "greedy", "fixed"),
    ("Alloc-L (dp)", "dp", "fixed"),
    ("Alloc-L + Alloc-T (dp+global)", "dp", "global"),
    ("Alloc-L + threshold (dp+threshold)", "dp", "threshold"),
]
SPEED_LABELS = ("uniform", "Alloc-L (dp)", "Alloc-L + Alloc-T (dp+global)", "Alloc-L + threshold (dp+threshold)")


@dataclass
class RunSettings:
    budgets: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    metric: str = "kl"
    renormalize: str = "native"
    calibration_tokens: int = 16384
    policy_calibration_tokens: int = 8192
    eval_tokens: int = 16384
    seq_len: int = 256
    batch_size: int = 8
    task_examples: int | None = None
    tasks: list[str] | None = None  # task JSON paths; None = the shipped tasks
    data: list[str] | None = None  # validation text files; None = the built-in validation split
    calibration_data: list[str] | None = None
    speed: bool = True
    seed: int = 0
    threads: int | None = None


def shipped_tasks() -> list[str]:
    d = builtin_text("validation").parent.parent / "tasks"
    return sorted(str(p) for p in d.glob("*.json"))


def prepare_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out} is not empty; pass --force to overwrite its files")
    (out / "plans").mkdir(parents=True, exist_ok=True)


def evaluate_config(model, tok, plan: Plan | None, texts, tasks: list[dict], s: RunSettings) -> dict:
    """Perplexity (with measured activations) and task accuracies with `plan` applied (None = full model)."""
    handle = apply(model, plan or full_plan(model))
    try:
        ppl = perplexity(model, tok, texts, seq_len=s.seq_len, batch_size=s.batch_size, max_tokens=s.eval_tokens,
                         progress=False)
        counts = handle.counts()["cumulative"]
        res = {"perplexity": ppl["perplexity"], "nll": ppl["nll"], "bits_per_byte": ppl["bits_per_byte"],
               "tokens": ppl["tokens"], "activations_per_token": counts["activations_per_token"],
               "activations_per_token_per_layer": counts["activations_per_token_per_layer"], "tasks": {}}
        for t in tasks:
            r = score_task(model, tok, t, batch_size=16, max_examples=s.task_examples, progress=False)
            res["tasks"][r["name"]] = {k: r[k] for k in ("accuracy", "accuracy_norm", "chance", "n")}
    finally:
        handle.remove()
    return res


def run(model_spec: str | None, out: Path, settings: RunSettings | None = None, force: bool = False,
        dtype: str = "float32") -> dict:
    s = settings or RunSettings()
    out = Path(out)
    prepare_out_dir(out, force)
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    t_start = time.perf_counter()
    model, tok, path = load_model(model_spec, dtype)
    layers = find_moe_layers(model)
    from .evaluate import load_task

    tasks = [load_task(p) for p in (s.tasks if s.tasks is not None else shipped_tasks())]
    val_texts, val_names = read_texts(s.data, "validation")
    cal_texts, cal_names = read_texts(s.calibration_data, "calibration")
    cal = token_windows(tok, cal_texts, s.seq_len, s.calibration_tokens, name=cal_names[0])
    pol_cal = cal[: max(1, s.policy_calibration_tokens // s.seq_len)]

    console.print(f"[bold]1/4 profiling[/bold] {len(layers)} MoE layers on {cal.numel():,} tokens")
    t0 = time.perf_counter()
    prof = run_profile(model, cal, metric=s.metric, batch_size=s.batch_size, renormalize=s.renormalize,
                       out=out / "profile.json", data_info={"files": cal_names})
    profile_seconds = time.perf_counter() - t0

    console.print("[bold]2/4 allocating[/bold] " + ", ".join(l for l, _, _ in METHODS)
                  + f" at budgets {s.budgets}")
    plans: list[tuple[str, str, float, Plan]] = []
    for b in s.budgets:
        for label, method, policy in METHODS:
            plan = allocate(prof if method in ("dp", "greedy") else model, b, method, model=model,
                            token_policy=policy, renormalize=s.renormalize, seed=s.seed, windows=pol_cal,
                            progress=False)
            name = f"{b}_{label.split(' (')[-1].rstrip(')').replace('+', '_').replace(' ', '_')}"
            plan.save(out / "plans" / f"{name}.json")
            plans.append((label, method, b, plan))

    console.print(f"[bold]3/4 evaluating[/bold] {len(plans) + 1} configurations on "
                  f"{min(s.eval_tokens, 10**9):,} validation tokens + {len(tasks)} tasks")
    from tqdm.auto import tqdm

    configs = []
    full_res = evaluate_config(model, tok, None, val_texts, tasks, s)
    configs.append(dict(label="full model", method="full", policy="fixed", budget=1.0,
                        ks=[l.top_k for l in layers], **full_res))
    for label, method, b, plan in tqdm(plans, desc="evaluating", unit="cfg"):
        r = evaluate_config(model, tok, plan, val_texts, tasks, s)
        configs.append(dict(label=label, method=method, policy=plan.policy, budget=b, ks=plan.ks,
                            plan_budget=plan.budget, token_policy=plan.token_policy, **r))

    speed_note = None
    if s.speed:
        console.print("[bold]4/4 benchmarking[/bold] prefill/decode, full vs main configurations")
        speed_note = _speed(model, plans, configs, s)

    results = {
        "allocmoe_version": __version__,
        "model": {"path": local_path(model_spec), "architecture": type(model).__name__,
                  "moe_layers": len(layers), "num_experts": layers[0].num_experts, "top_k": layers[0].top_k,
                  "shared_experts": layers[0].shared_experts,
                  "activations_per_token": sum(l.top_k for l in layers)},
        "settings": dict(vars(s), validation_files=val_names, calibration_files=cal_names,
                         profile_seconds=profile_seconds, threads=torch.get_num_threads(),
                         torch=torch.__version__, python=platform.python_version()),
        "profile": {"k_values": prof.k_values, "sensitivity": prof.sensitivity, "metric": prof.metric,
                    "metrics": prof.metrics, "tokens": prof.tokens},
        "configs": configs,
        "speed_note": speed_note,
        "wall_seconds": time.perf_counter() - t_start,
    }
    atomic_write_json(out / "results.json", results)
    write_report(results, out)
    dp_plans = {f"dp @ {b}": p.ks for label, m, b, p in plans if label == "Alloc-L (dp)"}
    sensitivity_heatmap(results["profile"], out / "allocation.png", dp_plans,
                        title="Sensitivity (log10) and Alloc-L's per-layer k at each budget")
    console.print(f"wrote {out}/results.json, report.md, frontier.png, allocation.png "
                  f"({results['wall_seconds']:.0f} s)")
    return results


def _speed(model, plans, configs, s: RunSettings) -> str:
    """Prefill/decode speed-ups of the main configurations at the budget nearest 0.5, measured side by side."""
    from .bench import FULL, run_bench

    mid = sorted(s.budgets, key=lambda b: abs(b - 0.5))[0]
    chosen = {label: plan for label, m, b, plan in plans if b == mid and label in SPEED_LABELS}
    res = run_bench(model, {FULL: None, **chosen}, prefill_batch=1, prefill_len=s.seq_len, decode_batches=(1,),
                    decode_tokens=16, repeats=3, warmup=1, progress=False)
    pre, dec = res["phases"]["prefill"]["configs"], res["phases"]["decode_b1"]["configs"]
    for c in configs:
        if c["budget"] == mid and c["label"] in chosen:
            c["speed"] = {"prefill_speedup": pre[c["label"]].get("speedup"),
                          "decode_speedup": dec[c["label"]].get("speedup")}
    return (f"Speed-ups at budget {mid} vs the full model, measured side by side in this run with "
            f"`allocmoe.bench.run_bench` ({torch.get_num_threads()} threads, prefill 1x{s.seq_len}, decode batch 1 "
            "x 16 tokens, interleaved, medians of 3). A small model on CPU is dominated by non-expert work; "
            "for a careful benchmark use `allocmoe bench`.")
