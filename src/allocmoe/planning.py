"""Plan-making in one call: a model (or a profile) and a budget in, a validated `Plan` out.

    plan = allocmoe.allocate(model, budget=0.5, tokenizer=tok)                      # Alloc-L (profiles first)
    plan = allocmoe.allocate(model, budget=0.5, token_policy="global", tokenizer=tok, profile="p.json")
    plan = allocmoe.allocate(model, budget=24, method="uniform")                     # no text needed
    plan = allocmoe.allocate(profile, 0.5)                                           # profile only (dp/greedy)

What is needed is derived from the registries: a method with `needs_profile` gets `profile` or profiles the
model on the calibration text; a calibrated token policy is tuned on the same text. Text comes from
`windows` (token ids [N, seq_len]) or `texts` + `tokenizer` (default texts: the built-in calibration split).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from . import __version__, allocators
from .adapters import find_moe_layers
from .errors import SettingsError
from .methods import AllocationContext, get_method
from .plan import Plan, check_fingerprint, fingerprint
from .policies import get_policy
from .profiling import Profile


def calibration_windows(tokenizer=None, texts: list[str] | None = None,
                        windows: torch.Tensor | None = None, tokens: int = 16384, seq_len: int = 256,
                        what: str = "this plan") -> torch.Tensor:
    """Token windows for profiling/calibration: `windows` as given, else `texts` (default: the built-in
    calibration split) tokenized into windows of `seq_len`, at most `tokens` tokens."""
    if windows is not None:
        return windows
    from .data import builtin_text, token_windows

    if tokenizer is None:
        raise SettingsError(f"{what} needs calibration text: pass windows=, or tokenizer= (and texts=)",
                            param="tokenizer")
    if texts is None:
        texts = [builtin_text("calibration").read_text(encoding="utf-8")]
    elif isinstance(texts, str):
        texts = [texts]
    return token_windows(tokenizer, list(texts), seq_len, tokens)


def allocate(source, budget=None, method: str = "dp", *, model: nn.Module | None = None,
             token_policy: str | dict = "fixed", renormalize: str = "native", seed: int = 0,
             tokenizer=None, texts: list[str] | None = None, windows: torch.Tensor | None = None,
             profile: "Profile | str | os.PathLike | dict | None" = None, calibration_tokens: int = 16384,
             seq_len: int = 256, k_min: int = 1, progress: bool = True, compensate: bool = False,
             compensation_rank: int | str = "auto") -> Plan:
    """A plan meeting `budget` (a fraction like 0.5, or an integer number of activations per token).

    `source` is the model (preferred) or a profile (Profile, dict or path; enough for dp/greedy).
    `compensate=True` also fits dropped-expert compensation on the calibration text (compensation.py):
    the plan then carries the maps, and `plan.save(path)` writes them beside the plan JSON.
    """
    if budget is None:
        raise SettingsError("pass a budget: a fraction like 0.5 or an integer number of activations per token",
                            param="budget")
    meth = get_method(method)
    pol = get_policy(token_policy if isinstance(token_policy, str) else token_policy.get("name", "?"))
    if isinstance(source, nn.Module):
        model = source
    else:
        profile = source if profile is None else profile
    prof = Profile.load(profile) if profile is not None else None
    needs_text = (meth.needs_profile and prof is None) or pol.calibrated or meth.needs_windows or compensate
    if model is None and (meth.needs_model or needs_text):
        what = ("profiling" if meth.needs_profile and prof is None
                else f"method {method!r}" if meth.needs_model or meth.needs_windows
                else f"token policy {pol.name!r}" if pol.calibrated else "compensation")
        raise SettingsError(f"{what} needs the model: call allocate(model, ...)", param="model")
    if needs_text:
        windows = calibration_windows(tokenizer, texts, windows, calibration_tokens, seq_len,
                                      what=f"method {method!r} with token policy {pol.name!r}")
    if meth.needs_profile and prof is None:
        from .profiling import profile as run_profile

        prof = run_profile(model, windows, k_min=k_min, renormalize=renormalize, progress=progress)

    if prof is not None:
        fp = prof.model
        if model is not None:
            check_fingerprint(fp, fingerprint(find_moe_layers(model), model), what="profile")
        k_values = prof.k_values
    else:
        layers = find_moe_layers(model)
        fp = fingerprint(layers, model)
        k_values = list(range(k_min, max(l.top_k for l in layers) + 1))
    L = fp["num_moe_layers"]
    K = fp["top_k"] if isinstance(fp["top_k"], int) else max(fp["top_k"])
    B = allocators.parse_budget(budget, L, K, min(k_values), max(k_values))

    tp = {"name": pol.name} if isinstance(token_policy, str) else dict(token_policy)
    # methods that score whole plans see the policy with the widest defaults the plan could get
    ctx = AllocationContext(budget=B, k_values=k_values, num_layers=L, profile=prof, model=model,
                            windows=windows, seed=seed, progress=progress,
                            token_policy={**pol.defaults(k_values, K), **tp}, meta={"budget_requested": str(budget)})
    ks = meth.allocate(ctx)
    for key, value in pol.defaults(ks, K).items():
        tp.setdefault(key, value)

    plan = Plan(layers=[{"k": int(k), "name": n} for k, n in zip(ks, fp.get("moe_layer_names") or [""] * L)],
                model=fp, token_policy=tp, renormalize=renormalize, method=method, meta=ctx.meta)
    plan.budget = plan.compute_budget()
    plan.validate()
    if pol.calibrated:
        from .calibration import calibrate

        plan = calibrate(model, plan, windows, progress=progress)
    if compensate:
        plan = add_compensation(model, plan, windows=windows, rank=compensation_rank, progress=progress)
    plan.meta["created_with"] = f"allocmoe {__version__}"
    return plan


def add_compensation(model: nn.Module, plan: Plan, *, tokenizer=None, texts: list[str] | None = None,
                     windows: torch.Tensor | None = None, rank: int | str = "auto", calibration_tokens: int = 16384,
                     seq_len: int = 256, progress: bool = True) -> Plan:
    """A copy of `plan` with dropped-expert compensation fitted on calibration text (compensation.py): both
    fitting modes (the full model's states, and layer by layer on the budgeted model's own states), the
    one with the lower KL on held-out calibration windows kept."""
    from .compensation import fit_best

    windows = calibration_windows(tokenizer, texts, windows, calibration_tokens, seq_len, what="compensation")
    out = Plan.from_dict(plan.to_dict())
    comp = fit_best(model, out, windows, rank=rank, ridge=0.1, progress=progress)
    out.compensation_maps, out.compensation = comp, comp.summary()
    return out
