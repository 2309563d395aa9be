"""The main job and the speed benchmark: `allocmoe run`, `allocmoe bench`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import AllocMoeError
from ..models import load_model
from ..run import RunSettings
from .common import (
    DeviceMapOpt, ForceOpt, MaxMemoryOpt, ModelOpt, OffloadDirOpt, app, checked_out, err, load_kwargs, write_json_result,
)


@app.command()
def run(
    model: Optional[str] = ModelOpt,
    out_dir: Path = typer.Option(Path("allocmoe-run"), "--out", "-o", help="Directory for results.json, report.md, plots."),
    budgets: str = typer.Option("0.25,0.5,0.75", help="Comma-separated budgets (fractions of the original)."),
    metric: str = typer.Option("kl", help="Profiling metric used by Alloc-L: kl or loss."),
    renormalize: str = typer.Option("native", help="native, renorm, keep-mass or keep-weights."),
    calibration_tokens: int = typer.Option(RunSettings.calibration_tokens, min=1,
                                           help="Tokens for sensitivity profiling."),
    policy_calibration_tokens: int = typer.Option(
        RunSettings.policy_calibration_tokens, min=1,
        help="Calibration tokens for calibrated token policies, compensation fits and the plan search."),
    eval_tokens: int = typer.Option(RunSettings.eval_tokens, min=1, help="Validation tokens per configuration."),
    ood_tokens: int = typer.Option(RunSettings.ood_tokens, min=0,
                                   help="Out-of-domain tokens per configuration (0: skip)."),
    data: Optional[List[Path]] = typer.Option(None, "--data", help="Validation text file(s)."),
    calibration_data: Optional[List[Path]] = typer.Option(None, "--calibration-data", help="Calibration text file(s)."),
    task: Optional[List[Path]] = typer.Option(None, "--task", help="Task JSON file(s) (default: shipped tasks)."),
    task_examples: Optional[int] = typer.Option(None, min=1, help="Cap on examples per task."),
    seq_len: int = typer.Option(256, min=2, help="Window length in tokens."),
    no_speed: bool = typer.Option(False, "--no-speed", help="Skip the speed measurement."),
    no_ablation: bool = typer.Option(False, "--no-ablation",
                                     help="Skip the lever-by-lever ablation at the budget nearest 0.5."),
    policy_aware: bool = typer.Option(False, "--policy-aware",
                                      help="Add policy-aware profiling to the ablation (a second profile)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's)."),
    profile_at: str = typer.Option(RunSettings.profile_at, "--profile-at",
                                   help="Alloc-L's profile: 'budget' (one per budget, at its operating point) or "
                                   "'full' (every other layer at full K, the paper's protocol)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or auto."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty output directory."),
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    offload_dir: Optional[Path] = OffloadDirOpt,
):
    """The main job: profile, allocate with every method at each budget, evaluate, benchmark, report."""
    from ..run import run as run_job

    try:
        bl = [float(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise AllocMoeError(f"--budgets must be comma-separated fractions like 0.25,0.5, got {budgets!r}") from None
    if not bl or any(not 0 < b <= 1 for b in bl):
        raise AllocMoeError(f"--budgets must be fractions in (0, 1], got {budgets!r}")
    for name, v in (("calibration-tokens", calibration_tokens), ("policy-calibration-tokens", policy_calibration_tokens),
                    ("eval-tokens", eval_tokens)):
        if v < seq_len:
            raise AllocMoeError(f"--{name} must be at least one window (--seq-len {seq_len}), got {v}")
    if policy_aware and no_ablation:
        raise AllocMoeError("--policy-aware adds a row to the ablation; it cannot go with --no-ablation")
    s = RunSettings(budgets=bl, metric=metric, renormalize=renormalize, calibration_tokens=calibration_tokens,
                    policy_calibration_tokens=policy_calibration_tokens, eval_tokens=eval_tokens,
                    ood_tokens=ood_tokens, ood_data=[] if ood_tokens == 0 else None, seq_len=seq_len, task_examples=task_examples,
                    tasks=[str(t) for t in task] if task else None, data=[str(d) for d in data] if data else None,
                    calibration_data=[str(d) for d in calibration_data] if calibration_data else None,
                    speed=not no_speed, ablation=not no_ablation, policy_aware=policy_aware, threads=threads,
                    profile_at=profile_at)
    run_job(model, out_dir, s, force=force, dtype=dtype,
            load_kwargs=load_kwargs(device_map, max_memory, offload_dir))


@app.command()
def bench(
    out_path: Path = typer.Option(..., "--out", "-o", help="bench JSON to write."),
    model: Optional[str] = ModelOpt,
    shape: Optional[str] = typer.Option(None, "--shape", help="Random-weight model with real dimensions, e.g. deepseek-v2-lite:4."),
    plan: Optional[List[Path]] = typer.Option(None, "--plan", "-p", help="Plan JSON(s) (default: uniform 50% fixed and global)."),
    prefill_batch: int = typer.Option(1, min=1, help="Prefill batch size."),
    prefill_len: int = typer.Option(256, min=1, help="Prefill sequence length."),
    decode_batches: str = typer.Option("1,8", help="Comma-separated decode batch sizes (\"\" skips decode)."),
    decode_tokens: int = typer.Option(32, min=1, help="New tokens per decode run."),
    repeats: int = typer.Option(5, min=1, help="Timed repeats per configuration (medians reported)."),
    warmup: int = typer.Option(1, min=0, help="Discarded warm-up runs per configuration."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch threads (default: torch's choice, recorded)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    markdown: Optional[Path] = typer.Option(None, help="Also write the human table here."),
    no_amdahl: bool = typer.Option(False, "--no-amdahl", help="Skip measuring the routed-expert share of time "
                                   "(ratios are then checked against A_full / A_plan only)."),
    decode_prompt: int = typer.Option(16, min=1, help="Untimed prompt tokens before each decode run."),
    seed: int = typer.Option(0, help="Seed of the random token ids."),
    experts_implementation: Optional[str] = typer.Option(
        None, help="config._experts_implementation for the run (grouped_mm, eager, batched_mm, allocmoe)."),
    sparse_path: Optional[str] = typer.Option(
        None, help="Kernel for calls with dropped slots (follow, auto, grouped, loop, batched, reference)."),
    remeasure: bool = typer.Option(True, "--remeasure/--no-remeasure",
                                   help="Time a phase once more when a ratio is above its limit or too spread."),
    force: bool = ForceOpt,
):
    """Prefill and decode timings, full model vs plans, interleaved in one run, with ratios and the Amdahl limit.

    Ratios more than 5% above their Amdahl limit, or from repeats whose IQR exceeds 10% of the median, are
    marked unreliable (⚠ in the table, "flags" in the JSON); the load average and thread count are recorded.
    """
    import torch

    from ..bench import FULL, BenchSettings, default_plans, format_table, load_plans, run_bench
    target = checked_out(out_path, force, "bench output")
    md_target = checked_out(markdown, force, "markdown table") if markdown else None
    if model and shape:
        raise AllocMoeError("pass either --model or --shape, not both")
    try:
        batches = tuple(int(b) for b in decode_batches.split(",") if b.strip())
    except ValueError:
        raise AllocMoeError(f"--decode-batches must be comma-separated integers, got {decode_batches!r}") from None
    if batches and min(batches) < 1:  # an empty list is allowed: prefill only
        raise AllocMoeError(f"--decode-batches must be positive integers, got {decode_batches!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise AllocMoeError("--device cuda was asked for but no CUDA device is available")
    settings = BenchSettings(prefill_batch=prefill_batch, prefill_len=prefill_len, decode_batches=batches,
                             decode_tokens=decode_tokens, decode_prompt=decode_prompt, repeats=repeats, warmup=warmup,
                             seed=seed, threads=threads, experts_implementation=experts_implementation,
                             sparse_path=sparse_path, amdahl=not no_amdahl, remeasure=remeasure)
    if threads:
        torch.set_num_threads(threads)
    if shape:
        from ..models import DTYPES
        from ..shapes import build_shape

        if dtype not in DTYPES or dtype == "auto":
            raise AllocMoeError(f"unknown dtype {dtype!r} (choose float32, bfloat16 or float16)")
        m = build_shape(shape, dtype=DTYPES[dtype], device=device)
    else:
        m, _, _ = load_model(model, dtype=dtype, device=device)
    plans = load_plans([str(p) for p in plan or []]) or default_plans(m, 0.5)
    r = run_bench(m, {FULL: None, **plans}, settings)
    r["command"] = " ".join(["allocmoe"] + sys.argv[1:])
    written = write_json_result(target, r)
    if md_target is not None:
        md_target.write_text(format_table(r) + "\n")
        if md_target.notice:
            err.print(f"notice: {md_target.notice}", highlight=False, markup=False, soft_wrap=True)
    print(format_table(r))
    err.print(f"wrote {written}")

