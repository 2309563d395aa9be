"""From a profile (or a model) and a budget to a Plan: Alloc-L and the baselines, plus token policies.

    allocate(profile, 0.5)                         # Alloc-L: exact DP on the profile
    allocate(profile, 0.5, method="greedy")        # baselines: uniform, random, greedy
    allocate(model, 0.5, method="uniform")         # uniform / random / lexi need no profile
    allocate(profile, 0.5, token_policy="global")  # Alloc-L + Alloc-T
    allocate(profile, 0.5, token_policy="threshold", model=model, windows=w)  # calibrated policies
"""

from __future__ import annotations

import torch
from torch import nn

from . import allocate as alloc
from .adapters import find_moe_layers
from .apply import apply
from .errors import AllocMoeError
from .plan import Plan, check_fingerprint, fingerprint, full_plan
from .profile import Profile

METHODS = ("dp", "uniform", "random", "greedy", "lexi")
NEEDS_PROFILE = ("dp", "greedy")


def lexi_sensitivity(model: nn.Module, k_values: list[int], tokens: int = 512, seed: int = 0) -> list[list[float]]:
    """Data-free sensitivity (LExI-style): relative change of each MoE block's output on random inputs.

    For layer l, x ~ N(0, 1) of the model's hidden size (seeded), S[l][k] = ||y_k - y_K||^2 / ||y_K||^2 where
    y_k is the block's output when it runs top-k. No text is read.
    """
    g = torch.Generator().manual_seed(seed)
    H = model.config.hidden_size
    dtype = next(model.parameters()).dtype
    x = torch.randn(1, tokens, H, generator=g).to(dtype)
    handle = apply(model, full_plan(model))
    S = []
    try:
        with torch.no_grad():
            for st in handle.states:
                def run():
                    out = st.layer.block(x)
                    return (out[0] if isinstance(out, tuple) else out).float()
                ref = run()
                row = []
                for k in k_values:
                    st.k = k
                    row.append(float(((run() - ref) ** 2).sum() / (ref ** 2).sum().clamp(min=1e-30)))
                st.k = st.layer.top_k
                S.append(row)
    finally:
        handle.remove()
    return S


def allocate(source, budget, method: str = "dp", *, model: nn.Module | None = None,
             token_policy: str | dict = "fixed", renormalize: str = "native", seed: int = 0,
             windows: torch.Tensor | None = None, k_min: int = 1, progress: bool = True) -> Plan:
    """A plan meeting `budget` (fraction like 0.5, or integer activations per token) with `method`."""
    if method not in METHODS:
        raise AllocMoeError(f"unknown allocation method {method!r}; valid methods: {', '.join(METHODS)}")
    profile = None
    if isinstance(source, nn.Module):
        model = source
    else:
        profile = Profile.load(source)
    if profile is None and method in NEEDS_PROFILE:
        raise AllocMoeError(f"method {method!r} needs a sensitivity profile (run `allocmoe profile` first)")
    if profile is not None:
        fp = profile.model
        if model is not None:
            check_fingerprint(fp, fingerprint(find_moe_layers(model), model), what="profile")
        k_values = profile.k_values
    else:
        layers = find_moe_layers(model)
        fp = fingerprint(layers, model)
        k_values = list(range(k_min, max(l.top_k for l in layers) + 1))
    L = fp["num_moe_layers"]
    K = fp["top_k"] if isinstance(fp["top_k"], int) else max(fp["top_k"])
    B = alloc.parse_budget(budget, L, K, min(k_values), max(k_values))
    meta = {"budget_requested": str(budget)}
    if method == "lexi":
        if model is None:
            raise AllocMoeError("method 'lexi' needs the model (pass --model)")
        S = lexi_sensitivity(model, k_values, seed=seed)
        ks = alloc.dp_allocate(S, k_values, B)
        meta["lexi_sensitivity"] = S
    elif method in ("dp", "greedy"):
        ks = alloc.allocate_matrix(profile.sensitivity, k_values, B, method)
        meta.update(profile_metric=profile.metric, profile_data=profile.data.get("fingerprint"),
                    predicted_cost=sum(profile.sensitivity[l][k_values.index(k)] for l, k in enumerate(ks)))
    else:
        ks = alloc.allocate_matrix([[0.0] * len(k_values)] * L, k_values, B, method, seed=seed)
        if method == "random":
            meta["seed"] = seed
    tp = {"name": token_policy} if isinstance(token_policy, str) else dict(token_policy)
    if tp["name"] != "fixed":
        tp.setdefault("min_k", 1)
        tp.setdefault("max_k", max(K, max(ks)))
    plan = Plan(layers=[{"k": int(k), "name": n} for k, n in zip(ks, fp.get("moe_layer_names") or [""] * L)],
                model=fp, token_policy=tp, renormalize=renormalize, method=method, meta=meta)
    plan.budget = plan.compute_budget()
    plan.validate()
    if tp["name"] in ("threshold", "top-p", "naee"):
        if model is None or windows is None:
            raise AllocMoeError(f"token policy {tp['name']!r} is calibrated on text: pass the model and "
                                "calibration data")
        from .calibrate import calibrate

        plan = calibrate(model, plan, windows, progress=progress)
    from . import __version__

    plan.meta["created_with"] = f"allocmoe {__version__}"
    return plan
