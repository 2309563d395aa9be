"""Allocation methods: how the per-layer counts K_l of a plan are chosen for a budget B.

Each method is one `AllocationMethod` subclass registered in `METHODS`; the CLI's choices, the checks in
`allocate`, and the configurations of the main job are all derived from this table, so adding a method
is one class here (or one in a module of its own that subclasses methods_base.AllocationMethod, registered
at the bottom of this file, like search.py's). The interface and the table live in methods_base.py.
"""

from __future__ import annotations

import torch
from torch import nn

from . import allocators, search
from .methods_base import METHODS, AllocationContext, AllocationMethod, get_method, register_method

__all__ = ["METHODS", "AllocationContext", "AllocationMethod", "get_method", "register_method", "lexi_sensitivity"]


# --------------------------------------------------------------------------------------------------


@register_method
class Uniform(AllocationMethod):
    name, label, summary = "uniform", "uniform", "B // L everywhere, the remainder +1 at evenly spaced layers"

    def allocate(self, ctx):
        return allocators.uniform_allocate(ctx.num_layers, ctx.k_values, ctx.budget)


@register_method
class Random(AllocationMethod):
    name, label, summary = "random", "random", "seeded, uniform over feasible allocations"

    def allocate(self, ctx):
        ctx.meta["seed"] = ctx.seed
        return allocators.random_allocate(ctx.num_layers, ctx.k_values, ctx.budget, seed=ctx.seed)


class _ProfileMethod(AllocationMethod):
    needs_profile = guarded = True

    def allocate(self, ctx):
        prof = ctx.profile
        ks = self.solve(prof.sensitivity, ctx.k_values, ctx.budget)
        ctx.meta.update(profile_metric=prof.metric, profile_data=prof.data.get("fingerprint"),
                        predicted_cost=sum(prof.sensitivity[l][ctx.k_values.index(k)] for l, k in enumerate(ks)))
        if prof.settings.get("token_policy", "fixed") != "fixed":
            ctx.meta["profile_token_policy"] = prof.settings["token_policy"]
        op = getattr(prof, "operating_point", None)
        if op is not None:  # where the profile's other layers ran (operating_point.py)
            ctx.meta["profile_operating_point"] = {k: op[k] for k in ("at", "around", "rounds", "converged") if k in op}
        return ks


@register_method
class Greedy(_ProfileMethod):
    name, label, summary = "greedy", "greedy", "cheapest marginal step on the profile"
    solve = staticmethod(allocators.greedy_allocate)


@register_method
class Lexi(AllocationMethod):
    name, label, needs_model, guarded = "lexi", "lexi", True, True
    summary = "data-free: each block's output perturbation on random inputs, then the exact DP"

    def allocate(self, ctx):
        S = lexi_sensitivity(ctx.model, ctx.k_values, seed=ctx.seed)
        ctx.meta["lexi_sensitivity"] = S
        return allocators.dp_allocate(S, ctx.k_values, ctx.budget)


@register_method
class DP(_ProfileMethod):
    name, label, summary = "dp", "Alloc-L (dp)", "Alloc-L: exact dynamic programming on the profile"
    solve = staticmethod(allocators.dp_allocate)


def lexi_sensitivity(model: nn.Module, k_values: list[int], tokens: int = 512, seed: int = 0) -> list[list[float]]:
    """Data-free sensitivity (LExI-style): relative change of each MoE block's output on random inputs.

    For layer l, x ~ N(0, 1) of the model's hidden size (seeded), S[l][k] = ||y_k - y_K||^2 / ||y_K||^2 where
    y_k is the block's output when it runs top-k. No text is read.
    """
    from .patching import apply
    from .plan import full_plan

    g = torch.Generator().manual_seed(seed)
    H = model.config.hidden_size
    dtype = next(model.parameters()).dtype
    x = torch.randn(1, tokens, H, generator=g).to(dtype)
    S = []
    with apply(model, full_plan(model)) as handle, torch.no_grad():
        for i, layer in enumerate(handle.layers):
            def run():
                out = layer.block(x)
                return (out[0] if isinstance(out, tuple) else out).float()
            ref = run()
            row = []
            for k in k_values:
                with handle.override_layer(i, k=k):
                    row.append(float(((run() - ref) ** 2).sum() / (ref ** 2).sum().clamp(min=1e-30)))
            S.append(row)
    return S


# methods in modules of their own: registered here, so importing methods.py gives the complete table
register_method(search.Search)
