"""Operating-point profiling (`profile(..., at=BUDGET)`, `allocmoe profile --at BUDGET`).

The full-K profile measures each layer with every other layer at its original K, but at a 50% budget no
layer ever runs beside full-K neighbours, so the per-layer costs the DP adds up are measured at the wrong
point. Here S[l][k] is KL(full model || model with layer l at k and every other layer at the budget's
allocation), and that allocation is found by a fixed-point loop:

  round 1: the other layers at the uniform allocation of the budget; DP on that profile -> plan P1;
  round r: re-profile around P(r-1); DP -> P(r); stop when the plan stops changing, or after `rounds`.

Each round is one cached profiling pass (profiling.py, `around=`): per batch one full-model forward (the
reference), one forward at the surrounding allocation (cached: decoder layers before l run the allocation's
k, which does not change while layer l varies) and one partial forward per (layer, k) candidate, so a round
runs about as many decoder layers as one full-K profile plus one full forward per batch (on the built-in model
13 + 13 + 390 decoder-layer runs per batch against 13 + 390), but with the other layers at the budget's k each
run executes fewer experts: on the built-in model at 0.5 the default 2 rounds took 1.17x the full-K profile's
wall time (80 s vs 69 s, scripts/operating_point_experiment.py), one round when the first DP plan is uniform.
The returned profile is the last round's; its `operating_point` records the budget, the allocation it was
measured around, the allocation of every round, and whether the DP plan on it equals that allocation (a
fixed point).
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from . import allocators, distributed
from .adapters import find_moe_layers
from .errors import ProfileError

DEFAULT_ROUNDS = 2  # uniform, then around its DP plan: within 2x the full-K profile (module docstring)
# candidate k per round: within WINDOW of the allocation measured around (its min - WINDOW .. max + WINDOW).
# S[l][k] far from the operating point is what the additive model extrapolates worst, and a plan that moves a
# layer further than this in one round is re-centred by the next round; on a top-8 model at 50% this measures 5
# of the 7 k values per layer (the profiling cost scales with the candidates).
WINDOW = 2


def profile_at(profile, model: nn.Module, windows: torch.Tensor, at, *, rounds: int | None = None,
               metric: str = "kl", k_from: int = 1, k_to: int | None = None, out: str | os.PathLike | None = None,
               write=None, progress: bool = True, window: int | None = WINDOW, **kw):
    """The profile at budget `at`'s operating point (module docstring). `profile` is profiling.profile (passed
    in, so neither module imports the other's), `kw` its other settings. Round r's partial file is
    `<out>.round<r>.partial.json`: `resume=True` continues the round in progress (finished rounds, whose
    partial files are gone, are recomputed; the result is the same)."""
    rounds = DEFAULT_ROUNDS if rounds is None else rounds
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ProfileError(f"rounds must be an integer >= 1, got {rounds!r}", param="rounds")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise ProfileError(f"window must be an integer >= 0 or None (every k), got {window!r}", param="window")
    layers = find_moe_layers(model)
    K = max(l.top_k for l in layers)
    k_hi = K if k_to is None else k_to
    if not 1 <= k_from <= k_hi:
        raise ProfileError(f"invalid candidate k range [{k_from}, {k_hi}]: need 1 <= k_from <= k_to", param="k_from")
    k_values = list(range(k_from, k_hi + 1))
    B = allocators.parse_budget(at, len(layers), K, k_from, k_hi)
    around = allocators.uniform_allocate(len(layers), k_values, B)
    history, elapsed = [], 0.0
    for r in range(rounds):
        history.append(around)
        if progress and distributed.is_main():
            print(f"operating point {at}: round {r + 1}/{rounds}, other layers at {around}", file=sys.stderr,
                  flush=True)
        lo, hi = k_from, k_hi
        if window is not None:
            lo, hi = max(k_from, min(around) - window), min(k_hi, max(around) + window)
        prof = profile(model, windows, metric=metric, k_from=lo, k_to=hi, progress=progress, around=around,
                       out=None if out is None else f"{out}.round{r + 1}", write=lambda d: None, **kw)
        elapsed += getattr(prof, "elapsed_s", 0.0)
        plan = allocators.dp_allocate(prof.sensitivity, prof.k_values, B)
        if plan == around:
            break
        if r + 1 < rounds:
            around = plan
    prof.operating_point = {"at": str(at), "budget": B, "around": around, "rounds": len(history), "window": window,
                            "allocations": history, "dp_plan": plan, "converged": plan == around}
    prof.elapsed_s = elapsed
    if out is not None and distributed.is_main():
        if write is None:
            prof.save(out)
        else:
            write(prof.to_dict())
    distributed.barrier()
    return prof
