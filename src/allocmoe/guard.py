"""The plan guard: a method that scores plans (dp, greedy, lexi, search) must beat uniform on held-out text.

The DP adds up per-layer costs; when the layers interact, its plan can be worse than uniform top-k at the
same budget (docs/results.md). So after such a method has chosen an allocation, the allocation, the uniform
one at the same budget, and (for an operating-point profile) the allocation the profile was measured around
(the previous round) are each scored as whole plans: mean KL(full model || plan) per token on held-out
calibration windows (the last `GUARD_TOKENS` tokens of the calibration text, disjoint from the windows the
profile, the calibration and the search read; never the evaluation text). The lowest one is returned
(ties keep the method's own); `meta["guard"]` records every figure and which was chosen, or why the guard
was skipped (no model weights, no held-out text).
"""

from __future__ import annotations

import torch
from torch import nn

from .divergence import mean_kl, references

GUARD_TOKENS = 2048
_BATCH = 8
# (id(model), windows fingerprint, policy) -> (model, references): the main job guards many plans on the same text
_refs_cache: dict[tuple, tuple] = {}


def held_out_windows(all_windows: torch.Tensor, used: int, tokens: int = GUARD_TOKENS) -> torch.Tensor | None:
    """The last `tokens` tokens (whole windows) of the calibration text's windows `all_windows`, when they do
    not overlap the first `used` windows (those read for profiling/calibration); else None."""
    n = max(1, tokens // all_windows.shape[1])
    if all_windows.shape[0] - n < used or n < 1:
        return None
    return all_windows[-n:]


def has_weights(model: nn.Module | None) -> bool:
    return model is not None and any(p.device.type != "meta" for p in model.parameters())


def _scorer(model: nn.Module, windows: torch.Tensor, token_policy: dict):
    from .data import fingerprint_tokens
    from .patching import apply
    from .plan import full_plan, make_plan

    key = (id(model), fingerprint_tokens(windows))
    hit = _refs_cache.get(key)
    if hit is None or hit[0] is not model:
        with apply(model, full_plan(model)):
            hit = (model, references(model, windows, _BATCH))
        _refs_cache.clear()
        _refs_cache[key] = hit
    refs = hit[1]

    def score(ks: list[int]) -> float:
        plan = make_plan(model, list(ks), token_policy=dict(token_policy), method="guard")
        with apply(model, plan, count_experts=False):
            return mean_kl(model, windows, refs, _BATCH)

    return score


def guard(model: nn.Module, ks: list[int], uniform: list[int], windows: torch.Tensor, token_policy: dict,
          previous: list[int] | None = None) -> tuple[list[int], dict]:
    """(the allocation to return, meta["guard"]) — see the module docstring. `token_policy` is the plan's
    (with its widest defaults; a calibrated policy is scored as fixed top-k, its knob not being tuned yet)."""
    from .policies import get_policy

    pol = get_policy(token_policy.get("name", "fixed"))
    tp = {"name": "fixed"} if pol.calibrated else dict(token_policy)
    score = _scorer(model, windows, tp)
    contenders = {"candidate": list(ks), "uniform": list(uniform)}
    if previous is not None and list(previous) not in contenders.values():
        contenders["previous"] = list(previous)
    kl = {}
    for name, alloc in contenders.items():  # an allocation met twice is scored once
        same = next((n for n in kl if contenders[n] == alloc), None)
        kl[name] = kl[same] if same is not None else score(alloc)
    chosen = min(kl, key=lambda n: (kl[n], n != "candidate"))  # ties keep the method's own allocation
    meta = {f"{n}_kl": v for n, v in kl.items()}
    meta.update(chosen=chosen, windows=int(windows.shape[0]), tokens=int(windows[:, 1:].numel()),
                scored_as=tp["name"], allocations=contenders)
    return contenders[chosen], meta
