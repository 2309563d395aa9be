"""Plan-making commands: `allocmoe info`, `allocmoe profile`, `allocmoe allocate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..errors import AllocMoeError
from ..methods import METHODS
from ..models import load_model
from ..policies import TOKEN_POLICIES
from ..recipe import CALIBRATION_TOKENS, SEQ_LEN
from .common import (
    METHOD_HELP, POLICY_HELP, DeviceMapOpt, ForceOpt, MaxMemoryOpt, ModelOpt, OffloadDirOpt, ParallelOpt, app, err,
    int_option, load_kwargs, out, text_windows,
)


@app.command()
def info(model: Optional[str] = ModelOpt, as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """Architecture, MoE layers, experts, top-k, shared experts and parameter counts of a model."""
    from ..adapters import find_moe_layers
    from ..models import load_skeleton, parameter_counts
    from ..plan import model_description

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
    tokens: int = typer.Option(CALIBRATION_TOKENS, min=1, help="Calibration tokens (whole windows)."),
    seq_len: int = typer.Option(SEQ_LEN, min=2, help="Window length in tokens."),
    batch_size: int = typer.Option(8, min=1, help="Windows per forward pass."),
    metric: str = typer.Option("kl", help="Metric the 'sensitivity' matrix holds: kl or loss (both are stored)."),
    k_from: int = typer.Option(1, "--k-from", "--k-min", min=1, help="Smallest candidate k per layer."),
    k_to: Optional[int] = typer.Option(None, "--k-to", "--k-max", min=1,
                                       help="Largest candidate k per layer (default: the model's top-k)."),
    renormalize: str = typer.Option("native", help="Weights of the kept experts: native, renorm, keep-mass or keep-weights."),
    token_policy: str = typer.Option("fixed", help="Profile each layer under this token policy (the one you will "
                                                   "deploy): " + ", ".join(TOKEN_POLICIES) + "."),
    naive: bool = typer.Option(False, "--naive", help="Run full forwards per candidate (slow; for comparison)."),
    at: str = typer.Option("full", "--at", help="Operating point: 'full' (every other layer at full K) or a budget "
                           "(0.5, or activations per token): every other layer at that budget's allocation, "
                           "uniform first, then re-profiled around the DP plan until it stops changing."),
    rounds: int = typer.Option(2, "--rounds", min=1, help="With --at BUDGET: most profiles made (each about one "
                               "full-K profile)."),
    window: int = typer.Option(2, "--window", min=0, help="With --at BUDGET: candidate k within this many of the "
                               "allocation each round is measured around."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from <out>.partial.json "
                                "(a finished <out> is replaced only with --force)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or auto."),
    force: bool = ForceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    offload_dir: Optional[Path] = OffloadDirOpt,
    parallel: Optional[str] = ParallelOpt,
):
    """Measure each MoE layer's sensitivity to running fewer experts (Alloc-L profiling)."""
    import time

    from ..io import prepare_output
    from ..plan import RENORM_MODES
    from ..policies import get_policy
    from ..profiling import METRICS, profile as run_profile

    # everything that can be checked without the model is checked before it loads
    if metric not in METRICS:
        raise AllocMoeError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")
    if renormalize not in RENORM_MODES:
        raise AllocMoeError(f"unknown renormalize mode {renormalize!r} (choose from {', '.join(RENORM_MODES)})")
    get_policy(token_policy)
    if at.strip().lower() != "full":
        from ..recipe import check_budget

        check_budget(at)
    if k_to is not None and k_to < k_from:
        raise AllocMoeError(f"--k-to {k_to} is below --k-from {k_from}")
    if resume and not force and out_path.is_file():
        raise AllocMoeError(f"{out_path} already exists: --resume continues an interrupted run (from "
                            f"{out_path}.partial.json) and never replaces a finished profile; pass --force to "
                            "profile again and replace it")
    target = prepare_output(out_path, force, what="profile")
    from ..distributed import init_from_env, is_main, local_device

    # under torchrun the ranks split the calibration batches (data parallel; one replica per GPU if any)
    device = local_device() if init_from_env() else "cpu"
    m, tok, path = load_model(model, dtype, device, **load_kwargs(device_map, max_memory, offload_dir, parallel))
    w, names = text_windows(tok, data, tokens, seq_len)
    err.print(f"profiling {path} on {w.numel():,} tokens ({w.shape[0]} windows of {seq_len})")
    t0 = time.perf_counter()
    p = run_profile(m, w, metric=metric, k_from=k_from, k_to=k_to, batch_size=batch_size, renormalize=renormalize,
                    cached=not naive, out=out_path, resume=resume, data_info={"files": names},
                    token_policy=token_policy, write=target.write_json, at=at, rounds=rounds,
                    window=window)
    if is_main():
        if target.notice:
            err.print(f"notice: {target.notice}", highlight=False, markup=False, soft_wrap=True)
        err.print(f"wrote {target.final_path()} ({time.perf_counter() - t0:.1f} s, metric={p.metric})")


def _recipe_file(path: Path):
    """A recipe from a JSON file: a recipe object, or a plan whose meta.recipe says how it was made."""
    from ..io import load_json
    from ..recipe import Recipe

    d = load_json(path, "recipe file")
    if isinstance(d, dict) and d.get("format") == "allocmoe-plan":
        d = (d.get("meta") or {}).get("recipe")
        if d is None:
            raise AllocMoeError(f"plan {path} records no recipe (made before recipes were stored)")
    elif isinstance(d, dict) and "format" in d:
        raise AllocMoeError(f"{path} is an {d['format']!r} file, not a recipe or a plan", param="recipe")
    return Recipe.from_dict(d)


@app.command()
def allocate(
    out_path: Path = typer.Option(..., "--out", "-o", help="Plan JSON to write."),
    budget: Optional[str] = typer.Option(None, "--budget", "-b", help="Fraction of the original budget (0.5) or "
                                         "integer activations per token (24); needed unless --recipe gives one."),
    profile_path: Optional[Path] = typer.Option(None, "--profile", "-p", help="Profile JSON (needed by dp and greedy)."),
    model: Optional[str] = ModelOpt,
    recipe_path: Optional[Path] = typer.Option(
        None, "--recipe", help="Recipe JSON (or a plan JSON: the recipe it records) to start from; the other "
        "flags given override its fields. Without --profile, the profile file it names is read."),
    method: Optional[str] = typer.Option(None, help="[default: dp] " + METHOD_HELP),
    token_policy: Optional[str] = typer.Option(None, help="[default: fixed] " + POLICY_HELP),
    renormalize: Optional[str] = typer.Option(None, help="native (default), renorm, keep-mass or keep-weights."),
    min_k: Optional[int] = typer.Option(None, min=1, help="Fewest experts per token (global/threshold/top-p/naee; "
                                        "default 1)."),
    max_k: Optional[int] = typer.Option(None, min=1, help="Most experts per token (default: the model's top-k)."),
    seed: Optional[int] = typer.Option(None, help="Seed for method=random, lexi and search (default 0)."),
    metric: Optional[str] = typer.Option(None, help="Use this metric's matrix from the profile (kl or loss)."),
    data: Optional[List[Path]] = typer.Option(None, "--data", help="Calibration text for calibrated token "
                                              "policies, the search and compensation (default: built-in split)."),
    tokens: Optional[int] = typer.Option(None, min=1, help=f"Calibration tokens (default {CALIBRATION_TOKENS})."),
    seq_len: Optional[int] = typer.Option(None, min=2, help=f"Window length for calibration (default {SEQ_LEN})."),
    compensate: Optional[bool] = typer.Option(
        None, "--compensate/--no-compensate", help="Also fit dropped-expert compensation on the calibration text "
        "(needs the model); written beside the plan as <plan>.compensation.safetensors and referenced from it."),
    compensation_rank: Optional[str] = typer.Option(
        None, help="Rank of the compensation maps: auto (default: largest within 10%% of the expert FLOPs the "
        "plan saves) or an integer."),
    force: bool = ForceOpt,
):
    """Choose per-layer expert counts that meet a budget, and write a plan (its meta records the recipe)."""
    from ..io import prepare_output
    from ..models import load_skeleton
    from ..plan import Plan
    from ..planning import allocate as run_allocate
    from ..profiling import Profile
    from ..recipe import Recipe

    base = _recipe_file(recipe_path) if recipe_path else None
    rank = compensation_rank if compensation_rank in (None, "auto") else int_option(compensation_rank,
                                                                                    "--compensation-rank")
    tp = None
    if token_policy is not None or min_k is not None or max_k is not None:
        name = token_policy or (base.token_policy.name if base else "fixed")
        params = dict(base.token_policy.params) if base and base.token_policy.name == name else {}
        if base is None or min_k is not None or "min_k" not in params:
            params["min_k"] = 1 if min_k is None else min_k
        if max_k is not None:
            params["max_k"] = max_k
        tp = {"name": name, **params}
    elif base is None:
        tp = {"name": "fixed", "min_k": 1}
    kw = dict(budget=budget, method=method, token_policy=tp, renormalize=renormalize, seed=seed, metric=metric,
              calibration_tokens=tokens, seq_len=seq_len, compensate=compensate, compensation_rank=rank,
              calibration_files=[str(d) for d in data] if data else None)
    r = (base or Recipe()).updated(**{k: v for k, v in kw.items() if v is not None})
    if r.budget is None:
        raise AllocMoeError("pass --budget (a fraction like 0.5 or an integer number of activations per token)")
    if profile_path is None and r.data.profile:
        profile_path = Path(r.data.profile)  # the profile the recipe was made with
    needs = r.needs(have_profile=profile_path is not None)
    if needs.profiling:
        raise AllocMoeError(f"method {r.method.name!r} needs --profile (run `allocmoe profile` first), or use "
                            "--method " + "/".join(n for n, x in METHODS.items() if not x.needs_profile))
    companions = (Plan.compensation_path,) if r.compensation.enabled else ()
    target = prepare_output(out_path, force, what="plan", companions=companions)
    prof = Profile.load(profile_path) if profile_path else None
    m = tok = None
    if needs.model:
        m, tok, _ = load_model(model)
    elif prof is None or model is not None:
        m, _ = load_skeleton(model)  # structure only: instant even for huge checkpoints
    plan = run_allocate(m, r, profile=str(profile_path) if profile_path else None,
                        tokenizer=tok)
    final = target.final_path()
    plan.save(final)
    if target.notice:
        err.print(f"notice: {target.notice}", highlight=False, markup=False, soft_wrap=True)
    b = plan.budget
    err.print(f"wrote {final}: {r.method.name} + {r.token_policy.name}, k per layer {plan.ks}, "
              f"{b['activations_per_token']} of {b['original_activations_per_token']} activations/token "
              f"({b['fraction']:.3f})" + (f"; compensation in {Plan.compensation_path(final).name}, ranks "
                                          f"{plan.compensation['ranks']}" if plan.compensation else ""))
