"""The `allocmoe` command line. Every command: --help, progress on stderr, exit 0 on success and a
one-line `error: ...` with exit code 2 on bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import AllocMoeError
from .methods import METHODS
from .models import load_model
from .policies import TOKEN_POLICIES
from .run import RunSettings

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run a Mixture-of-Experts model under an expert-activation budget (Alloc-MoE).")
err = Console(stderr=True)
out = Console()

MODEL_HELP = "Local Hugging Face model directory or hub id (default: the built-in model)."
_METHOD_HELP = "; ".join(f"{n}: {m.summary}" + (" (needs --profile)" if m.needs_profile else "")
                         for n, m in METHODS.items())
_POLICY_HELP = "; ".join(f"{n}: {p.summary}" + (" (calibrated on text)" if p.calibrated else "")
                         for n, p in TOKEN_POLICIES.items())
ModelOpt = typer.Option(None, "--model", "-m", help=MODEL_HELP)
ForceOpt = typer.Option(False, "--force", help="Overwrite an existing output file.")
# large models (README "Large models"): accelerate's offload and transformers' tensor / expert parallel
DeviceMapOpt = typer.Option(None, "--device-map", help="accelerate device map, e.g. auto: spread layers over the "
                                                       "GPUs, CPU and disk (implied by --max-memory).")
MaxMemoryOpt = typer.Option(None, "--max-memory", help="Memory cap per device, e.g. cpu=8GiB or 0=70GiB,cpu=100GiB "
                                                       "(a bare size caps the CPU); layers beyond it are offloaded.")
OffloadDirOpt = typer.Option(None, "--offload-dir", help="Folder for offloaded weights (default: a temporary one).")
ParallelOpt = typer.Option(None, "--parallel", help="Under torchrun --nproc-per-node N: tp (tensor parallel) or ep "
                                                    "(expert parallel; N must divide the experts) via transformers' "
                                                    "DistributedConfig.")


def _load_kwargs(device_map=None, max_memory=None, offload_dir=None, parallel=None) -> dict:
    return {"device_map": device_map, "max_memory": max_memory, "offload_dir": offload_dir, "parallel": parallel}


def _out_path(path: Path, force: bool) -> Path:
    from .io import check_can_write

    check_can_write(path, force)
    return path


def _int_option(value: str, flag: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise AllocMoeError(f"{flag} must be 'auto' or an integer, got {value!r}") from None


def _windows(model_tok, data, tokens, seq_len, split="calibration"):
    from .data import read_texts, token_windows

    texts, names = read_texts(data, split)
    name = names[0] if len(names) == 1 else f"{len(names)} text files"
    return token_windows(model_tok, texts, seq_len, tokens, name=name), names


@app.command()
def info(model: Optional[str] = ModelOpt, as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """Architecture, MoE layers, experts, top-k, shared experts and parameter counts of a model."""
    from .adapters import find_moe_layers
    from .models import load_skeleton, parameter_counts
    from .plan import model_description

    m, path = load_skeleton(model)
    layers = find_moe_layers(m)
    params = parameter_counts(m, layers)
    d = {"path": path, **model_description(m, layers), "parameters": params}
    if as_json:
        print(json.dumps(d, indent=2))
        return
    t = Table(show_header=False, box=None)
    for k in ("path", "architecture", "family", "decoder_layers", "moe_layers", "dense_layers", "num_experts",
              "top_k", "shared_experts", "activations_per_token", "hidden_size", "vocab_size"):
        t.add_row(k, str(d[k]))
    t.add_row("parameters", f"{params['total']:,} total, {params['routed_experts']:,} in routed experts, "
                            f"{params['active_per_token']:,} active per token")
    t.add_row("routing", ", ".join(f"{k}={v}" for k, v in d["routing"].items()))
    out.print(t)


@app.command()
def profile(
    model: Optional[str] = ModelOpt,
    out_path: Path = typer.Option(..., "--out", "-o", help="Profile JSON to write."),
    data: Optional[List[Path]] = typer.Option(None, "--data", help="Calibration text file(s) (default: built-in calibration split)."),
    tokens: int = typer.Option(16384, help="Calibration tokens (whole windows)."),
    seq_len: int = typer.Option(256, help="Window length in tokens."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    metric: str = typer.Option("kl", help="Metric the 'sensitivity' matrix holds: kl or loss (both are stored)."),
    k_min: int = typer.Option(1, help="Smallest candidate k."),
    k_max: Optional[int] = typer.Option(None, help="Largest candidate k (default: the model's top-k)."),
    renormalize: str = typer.Option("native", help="Weights of the kept experts: native, renorm or keep-mass."),
    token_policy: str = typer.Option("fixed", help="Profile each layer under this token policy (the one you will "
                                                   "deploy): " + ", ".join(TOKEN_POLICIES) + "."),
    naive: bool = typer.Option(False, "--naive", help="Run full forwards per candidate (slow; for comparison)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from <out>.partial.json."),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or auto."),
    force: bool = ForceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    offload_dir: Optional[Path] = OffloadDirOpt,
    parallel: Optional[str] = ParallelOpt,
):
    """Measure each MoE layer's sensitivity to running fewer experts (Alloc-L profiling)."""
    import time

    from .profiling import profile as run_profile

    _out_path(out_path, force or resume)
    from .distributed import init_from_env, is_main, local_device

    # under torchrun the ranks split the calibration batches (data parallel; one replica per GPU if any)
    device = local_device() if init_from_env() else "cpu"
    m, tok, path = load_model(model, dtype, device, **_load_kwargs(device_map, max_memory, offload_dir, parallel))
    w, names = _windows(tok, data, tokens, seq_len)
    err.print(f"profiling {path} on {w.numel():,} tokens ({w.shape[0]} windows of {seq_len})")
    t0 = time.perf_counter()
    p = run_profile(m, w, metric=metric, k_min=k_min, k_max=k_max, batch_size=batch_size, renormalize=renormalize,
                    cached=not naive, out=out_path, resume=resume, data_info={"files": names},
                    token_policy=token_policy)
    if is_main():
        err.print(f"wrote {out_path} ({time.perf_counter() - t0:.1f} s, metric={p.metric})")


@app.command()
def allocate(
    out_path: Path = typer.Option(..., "--out", "-o", help="Plan JSON to write."),
    budget: str = typer.Option(..., "--budget", "-b", help="Fraction of the original budget (0.5) or integer activations per token (24)."),
    profile_path: Optional[Path] = typer.Option(None, "--profile", "-p", help="Profile JSON (needed by dp and greedy)."),
    model: Optional[str] = ModelOpt,
    method: str = typer.Option("dp", help=_METHOD_HELP),
    token_policy: str = typer.Option("fixed", help=_POLICY_HELP),
    renormalize: str = typer.Option("native", help="native, renorm or keep-mass."),
    min_k: int = typer.Option(1, help="Fewest experts per token (global/threshold/top-p/naee)."),
    max_k: Optional[int] = typer.Option(None, help="Most experts per token (default: the model's top-k)."),
    seed: int = typer.Option(0, help="Seed for method=random and lexi."),
    metric: Optional[str] = typer.Option(None, help="Use this metric's matrix from the profile (kl or loss)."),
    data: Optional[List[Path]] = typer.Option(None, "--data", help="Calibration text for calibrated token policies."),
    tokens: int = typer.Option(8192, help="Calibration tokens for calibrated token policies."),
    seq_len: int = typer.Option(256, help="Window length for calibration."),
    compensate: bool = typer.Option(False, "--compensate", help="Also fit dropped-expert compensation on the "
                                    "calibration text (needs the model); written beside the plan as "
                                    "<plan>.compensation.safetensors and referenced from it."),
    compensation_rank: str = typer.Option("auto", help="Rank of the compensation maps: auto (largest within 10%% "
                                          "of the expert FLOPs the plan saves) or an integer."),
    force: bool = ForceOpt,
):
    """Choose per-layer expert counts that meet a budget, and write a plan."""
    from .methods import get_method
    from .models import load_skeleton
    from .plan import Plan
    from .planning import allocate as run_allocate
    from .policies import get_policy
    from .profiling import Profile

    _out_path(out_path, force)
    if compensate:  # the maps go beside the plan: never overwrite them silently either
        _out_path(Plan.compensation_path(out_path), force)
    rank = compensation_rank if compensation_rank == "auto" else _int_option(compensation_rank, "--compensation-rank")
    meth, pol = get_method(method), get_policy(token_policy)
    if meth.needs_profile and profile_path is None:
        raise AllocMoeError(f"method {method!r} needs --profile (run `allocmoe profile` first), or use --method "
                            + "/".join(n for n, x in METHODS.items() if not x.needs_profile))
    prof = Profile.load(profile_path) if profile_path else None
    if prof is not None and metric:
        prof = prof.with_metric(metric)
    needs_weights = pol.calibrated or meth.needs_model or meth.needs_windows or compensate
    m = tok = windows = None
    if needs_weights:
        m, tok, _ = load_model(model)
    elif prof is None or model is not None:
        m, _ = load_skeleton(model)  # structure only: instant even for huge checkpoints
    if pol.calibrated or meth.needs_windows or compensate:
        windows, _ = _windows(tok, data, tokens, seq_len)
    tp = {"name": token_policy, "min_k": min_k}
    if max_k is not None:
        tp["max_k"] = max_k
    plan = run_allocate(m if m is not None else prof, budget, method, profile=prof, token_policy=tp,
                        renormalize=renormalize, seed=seed, windows=windows, compensate=compensate,
                        compensation_rank=rank)
    plan.save(out_path)
    b = plan.budget
    err.print(f"wrote {out_path}: {method} + {token_policy}, k per layer {plan.ks}, "
              f"{b['activations_per_token']} of {b['original_activations_per_token']} activations/token "
              f"({b['fraction']:.3f})" + (f"; compensation in {Plan.compensation_path(out_path).name}, ranks "
                                          f"{plan.compensation['ranks']}" if plan.compensation else ""))


@app.command("eval")
def eval_cmd(
    out_path: Path = typer.Option(..., "--out", "-o", help="eval JSON to write."),
    model: Optional[str] = ModelOpt,
    plan: Optional[Path] = typer.Option(None, "--plan", "-p", help="Plan JSON to apply (default: the full model)."),
    data: Optional[List[Path]] = typer.Option(None, "--data", help="Text file(s) for perplexity (default: built-in validation split)."),
    task: Optional[List[Path]] = typer.Option(None, "--task", help="BIG-bench-style JSON task(s) (default: the shipped tasks)."),
    seq_len: int = typer.Option(256, help="Window length in tokens (non-overlapping windows)."),
    max_tokens: Optional[int] = typer.Option(None, min=1, help="Cap on scored tokens for perplexity."),
    batch_size: int = typer.Option(8, min=1, help="Windows per forward pass."),
    max_examples: Optional[int] = typer.Option(None, min=1, help="Cap on examples per task."),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or auto."),
    force: bool = ForceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    offload_dir: Optional[Path] = OffloadDirOpt,
    parallel: Optional[str] = ParallelOpt,
):
    """Perplexity, bits per byte and task accuracy, with a plan applied, and the activations that really ran."""
    from .data import read_texts
    from .evaluation import evaluate, load_task, shipped_tasks
    from .io import atomic_write_json
    from .plan import Plan

    _out_path(out_path, force)
    p = Plan.load(plan) if plan else None
    m, tok, path = load_model(model, dtype, **_load_kwargs(device_map, max_memory, offload_dir, parallel))
    texts, names = read_texts(data, "validation")
    tasks = [load_task(t) for t in (task or shipped_tasks())]
    err.print(f"evaluating {path}" + (f" with plan {plan}" if plan else " (full model)"))
    r = evaluate(m, p, tokenizer=tok, texts=texts, tasks=tasks, seq_len=seq_len, batch_size=batch_size,
                 max_tokens=max_tokens, max_examples=max_examples)
    r = dict(r, model=path, plan=str(plan) if plan else None, data=names, seq_len=seq_len)
    from .distributed import is_main

    if is_main():  # under torchrun every rank evaluates the same text; rank 0 writes
        atomic_write_json(out_path, r)
    err.print(f"perplexity {r['perplexity']:.3f}, bits/byte {r['bits_per_byte']:.4f}, "
              f"activations/token {r['activations_per_token']:.3f}"
              + (f" + compensation {r['compensation']['macs_per_token']:,.0f} MACs/token "
                 f"(= {r['compensation']['expert_pair_equivalents_per_token']:.2f} expert activations)"
                 if "compensation" in r else "")
              + "".join(f", {n} acc {t['accuracy']:.3f}" for n, t in r["tasks"].items()))


@app.command()
def run(
    model: Optional[str] = ModelOpt,
    out_dir: Path = typer.Option(Path("allocmoe-run"), "--out", "-o", help="Directory for results.json, report.md, plots."),
    budgets: str = typer.Option("0.25,0.5,0.75", help="Comma-separated budgets (fractions of the original)."),
    metric: str = typer.Option("kl", help="Profiling metric used by Alloc-L: kl or loss."),
    renormalize: str = typer.Option("native", help="native, renorm or keep-mass."),
    calibration_tokens: int = typer.Option(RunSettings.calibration_tokens, help="Tokens for sensitivity profiling."),
    policy_calibration_tokens: int = typer.Option(
        RunSettings.policy_calibration_tokens,
        help="Calibration tokens for calibrated token policies, compensation fits and the plan search."),
    eval_tokens: int = typer.Option(RunSettings.eval_tokens, help="Validation tokens per configuration."),
    ood_tokens: int = typer.Option(RunSettings.ood_tokens, help="Out-of-domain tokens per configuration (0: skip)."),
    data: Optional[List[Path]] = typer.Option(None, "--data", help="Validation text file(s)."),
    calibration_data: Optional[List[Path]] = typer.Option(None, "--calibration-data", help="Calibration text file(s)."),
    task: Optional[List[Path]] = typer.Option(None, "--task", help="Task JSON file(s) (default: shipped tasks)."),
    task_examples: Optional[int] = typer.Option(None, help="Cap on examples per task."),
    seq_len: int = typer.Option(256, help="Window length in tokens."),
    no_speed: bool = typer.Option(False, "--no-speed", help="Skip the speed measurement."),
    no_ablation: bool = typer.Option(False, "--no-ablation",
                                     help="Skip the lever-by-lever ablation at the budget nearest 0.5."),
    policy_aware: bool = typer.Option(False, "--policy-aware",
                                      help="Add policy-aware profiling to the ablation (a second profile)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or auto."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty output directory."),
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    offload_dir: Optional[Path] = OffloadDirOpt,
):
    """The main job: profile, allocate with every method at each budget, evaluate, benchmark, report."""
    from .run import run as run_job

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
    if threads is not None and threads < 1:
        raise AllocMoeError(f"--threads must be at least 1, got {threads}")
    s = RunSettings(budgets=bl, metric=metric, renormalize=renormalize, calibration_tokens=calibration_tokens,
                    policy_calibration_tokens=policy_calibration_tokens, eval_tokens=eval_tokens,
                    ood_tokens=ood_tokens, ood_data=[] if ood_tokens == 0 else None, seq_len=seq_len, task_examples=task_examples,
                    tasks=[str(t) for t in task] if task else None, data=[str(d) for d in data] if data else None,
                    calibration_data=[str(d) for d in calibration_data] if calibration_data else None,
                    speed=not no_speed, ablation=not no_ablation, policy_aware=policy_aware, threads=threads)
    run_job(model, out_dir, s, force=force, dtype=dtype,
            load_kwargs=_load_kwargs(device_map, max_memory, offload_dir))


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    model: Optional[str] = ModelOpt,
    plan: Optional[Path] = typer.Option(None, "--plan", "-p", help="Plan JSON to apply (default: the full model)."),
    max_new_tokens: int = typer.Option(48, help="Tokens to generate."),
    sample: bool = typer.Option(False, "--sample", help="Sample (temperature 0.8, top-p 0.95) instead of greedy."),
    seed: int = typer.Option(0, help="Seed for sampling."),
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    offload_dir: Optional[Path] = OffloadDirOpt,
    parallel: Optional[str] = ParallelOpt,
):
    """Continue a prompt with a plan applied and print the text and the activations it used."""
    import torch

    from .patching import apply
    from .plan import Plan, full_plan

    m, tok, _ = load_model(model, **_load_kwargs(device_map, max_memory, offload_dir, parallel))
    if tok is None:
        raise AllocMoeError("the model has no tokenizer")
    p = Plan.load(plan) if plan else full_plan(m)
    enc = tok(prompt, return_tensors="pt")
    if enc["input_ids"].numel() == 0:
        raise AllocMoeError("--prompt is empty")
    torch.manual_seed(seed)
    with apply(m, p) as h, torch.no_grad():
        outp = m.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sample, temperature=0.8 if sample else None,
                          top_p=0.95 if sample else None, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        c = h.counts()["cumulative"]
    from .distributed import is_main

    if not is_main():  # under torchrun every rank generates the same text; rank 0 prints it
        return
    out.print(tok.decode(outp[0], skip_special_tokens=True), highlight=False, markup=False)
    err.print(f"activations/token {c['activations_per_token']:.2f} (measured over {c['tokens']} tokens; "
              f"full model: {sum(p.original_ks)}), per layer "
              + ", ".join(f"{a:.2f}" for a in c["activations_per_token_per_layer"]))


@app.command("lm-eval")
def lm_eval_cmd(
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated lm-eval task names."),
    out_path: Path = typer.Option(..., "--out", "-o", help="JSON to write."),
    model: Optional[str] = ModelOpt,
    plan: Optional[Path] = typer.Option(None, "--plan", "-p", help="Plan JSON to apply."),
    include_path: Optional[Path] = typer.Option(None, help="Folder of local task YAMLs."),
    limit: Optional[float] = typer.Option(None, help="Examples per task (int) or fraction (< 1)."),
    batch_size: int = typer.Option(8),
    num_fewshot: Optional[int] = typer.Option(None),
    force: bool = ForceOpt,
):
    """Hand the patched model to lm-evaluation-harness (HFLM) and write its results."""
    from .patching import apply
    from .io import atomic_write_json
    from .lm_eval_adapter import run_lm_eval
    from .plan import Plan, full_plan

    _out_path(out_path, force)
    m, tok, _ = load_model(model)
    p = Plan.load(plan) if plan else full_plan(m)
    lim = int(limit) if limit is not None and limit >= 1 else limit
    with apply(m, p) as h:
        r = run_lm_eval(m, tok, [t.strip() for t in tasks.split(",") if t.strip()],
                        include_path=str(include_path) if include_path else None, limit=lim,
                        batch_size=batch_size, num_fewshot=num_fewshot)
        r["allocmoe"] = {"plan": str(plan) if plan else None,
                         "activations_per_token": h.counts()["cumulative"]["activations_per_token"]}
    atomic_write_json(out_path, r)
    err.print(f"wrote {out_path}")


@app.command()
def bench(
    out_path: Path = typer.Option(..., "--out", "-o", help="bench JSON to write."),
    model: Optional[str] = ModelOpt,
    shape: Optional[str] = typer.Option(None, "--shape", help="Random-weight model with real dimensions, e.g. deepseek-v2-lite:4."),
    plan: Optional[List[Path]] = typer.Option(None, "--plan", "-p", help="Plan JSON(s) (default: uniform 50% fixed and global)."),
    prefill_batch: int = typer.Option(1, help="Prefill batch size."),
    prefill_len: int = typer.Option(256, help="Prefill sequence length."),
    decode_batches: str = typer.Option("1,8", help="Comma-separated decode batch sizes."),
    decode_tokens: int = typer.Option(32, help="New tokens per decode run."),
    repeats: int = typer.Option(5, help="Timed repeats per configuration (medians reported)."),
    warmup: int = typer.Option(1, help="Discarded warm-up runs per configuration."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's choice, recorded)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    markdown: Optional[Path] = typer.Option(None, help="Also write the human table here."),
    no_amdahl: bool = typer.Option(False, "--no-amdahl", help="Skip measuring the routed-expert share of time "
                                   "(ratios are then checked against A_full / A_plan only)."),
    decode_prompt: int = typer.Option(16, help="Untimed prompt tokens before each decode run."),
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

    from .bench import FULL, BenchSettings, default_plans, format_table, load_plans, run_bench
    from .io import atomic_write_json, atomic_write_text

    _out_path(out_path, force)
    if model and shape:
        raise AllocMoeError("pass either --model or --shape, not both")
    try:
        batches = tuple(int(b) for b in decode_batches.split(",") if b.strip())
    except ValueError:
        raise AllocMoeError(f"--decode-batches must be comma-separated integers, got {decode_batches!r}") from None
    if device == "cuda" and not torch.cuda.is_available():
        raise AllocMoeError("--device cuda was asked for but no CUDA device is available")
    settings = BenchSettings(prefill_batch=prefill_batch, prefill_len=prefill_len, decode_batches=batches,
                             decode_tokens=decode_tokens, decode_prompt=decode_prompt, repeats=repeats, warmup=warmup,
                             seed=seed, threads=threads, experts_implementation=experts_implementation,
                             sparse_path=sparse_path, amdahl=not no_amdahl, remeasure=remeasure)
    if threads:
        torch.set_num_threads(threads)
    if shape:
        from .models import DTYPES
        from .shapes import build_shape

        if dtype not in DTYPES or dtype == "auto":
            raise AllocMoeError(f"unknown dtype {dtype!r} (choose float32, bfloat16 or float16)")
        m = build_shape(shape, dtype=DTYPES[dtype], device=device)
    else:
        m, _, _ = load_model(model, dtype=dtype, device=device)
    plans = load_plans([str(p) for p in plan or []]) or default_plans(m, 0.5)
    r = run_bench(m, {FULL: None, **plans}, settings)
    r["command"] = " ".join(["allocmoe"] + sys.argv[1:])
    atomic_write_json(out_path, r)
    if markdown:
        atomic_write_text(markdown, format_table(r) + "\n")
    print(format_table(r))
    err.print(f"wrote {out_path}")


@app.command()
def serve(
    model: Optional[str] = ModelOpt,
    plan: Optional[Path] = typer.Option(None, "--plan", "-p", help="Plan JSON to apply (default: the full model)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (default: this machine only)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    continuous_batching: bool = typer.Option(
        False, "--continuous-batching", help="Pack concurrent requests into shared forward calls (transformers' "
        "continuous batching, paged KV cache; not for multi-head-latent-attention models such as DeepSeek-V2)."),
    served_model_name: Optional[str] = typer.Option(
        None, help="Model name clients send (default: the --model value, or allocmoe/default)."),
    max_batch_tokens: int = typer.Option(512, help="Continuous batching: most tokens in one forward call."),
    num_blocks: int = typer.Option(64, help="Continuous batching: KV cache blocks (of --page-size tokens)."),
    page_size: int = typer.Option(64, help="Continuous batching: tokens per KV cache page."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's choice)."),
    log_level: str = typer.Option("warning", help="uvicorn log level."),
):
    """Serve the model with a plan applied: OpenAI-compatible /v1/models, /v1/completions, /v1/chat/completions.

    transformers' own server (`transformers serve`) with the patched model preloaded. Each completion's usage
    block carries the measured activations per token (`activations_per_token`, and the server's so far);
    non-streaming responses also carry them in the x-allocmoe-activations-per-token header.
    """
    from .serving import ServeSettings, serve as run_server

    run_server(ServeSettings(model=model, plan=str(plan) if plan else None, host=host, port=port,
                             continuous_batching=continuous_batching, served_model_name=served_model_name,
                             max_batch_tokens=max_batch_tokens, num_blocks=num_blocks, page_size=page_size,
                             threads=threads, log_level=log_level),
               log=lambda s: err.print(s, highlight=False, markup=False, soft_wrap=True))


# Library errors name API parameters (`AllocMoeError.param`); the CLI adds the flag that sets each one.
FLAG_HINTS = {
    "force": "pass --force to overwrite", "resume": "--resume", "seq_len": "--seq-len", "model": "--model",
    "data": "--data", "dtype": "--dtype", "method": "--method", "budget": "--budget",
    "token_policy": "--token-policy", "max_tokens": "--max-tokens", "tokenizer": "--model", "record": None,
    "max_memory": "--max-memory", "device_map": "--device-map", "parallel": "--parallel",
    "repeats": "--repeats", "warmup": "--warmup", "threads": "--threads", "decode_batches": "--decode-batches",
    "prefill_len": "--prefill-len", "experts_implementation": "--experts-implementation",
    "sparse_path": "--sparse-path", "continuous_batching": "--continuous-batching", "port": "--port",
}


def error_line(e: AllocMoeError) -> str:
    hint = FLAG_HINTS.get(getattr(e, "param", None) or "")
    return f"{e} ({hint})" if hint else str(e)


def run_cli(argv: list[str] | None = None) -> int:
    """Run the command line on `argv` (default: sys.argv[1:]) and return the exit code; errors are one line."""
    try:
        # with standalone_mode=False click returns (not raises) the code of an Exit, e.g. 130 after Ctrl-C
        rc = app(args=argv, prog_name="allocmoe", standalone_mode=False)
    except AllocMoeError as e:
        err.print(f"[red]error:[/red] {error_line(e)}", highlight=False, soft_wrap=True)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        return 130
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:  # usage errors (bad option values, unknown options)
        # typer >= 0.26 vendors click (typer._click), so its exceptions are not click.ClickException;
        # both kinds have show() and exit_code
        if any(c.__name__ == "ClickException" for c in type(e).__mro__):
            e.show()
            return e.exit_code
        raise
    return rc if isinstance(rc, int) else 0


def main() -> None:
    sys.exit(run_cli())


if __name__ == "__main__":
    main()
