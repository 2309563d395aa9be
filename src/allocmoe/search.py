"""End-to-end plan search (`method="search"`): a seeded (1+lambda) evolutionary search over per-layer counts.

The DP minimises a *sum* of per-layer costs, each measured with every other layer at full K; real costs
interact (EvoPress, arXiv 2410.14649; SPDY, arXiv 2201.13096). The search scores whole plans instead:

- start: the `dp` plan when a profile is available, else `uniform`;
- mutation (EvoPress's level switch): move one activation from a random layer to another, so sum K_l
  stays exactly the budget; a few such moves per offspring;
- fitness: mean KL(full model || plan) per scored token on calibration windows, with the plan applied
  under its token policy (the reference log-probabilities are computed once and reused);
- multi-fidelity selection: every offspring is scored on a few windows, the best few on many; the parent
  is replaced only by an offspring that is strictly better on the many-window fitness, so the result is
  never worse than the start on that fitness.

Same seed, model, windows and budget give the same plan.
"""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm

from . import allocators
from .divergence import Reference, mean_kl, references
from .methods_base import AllocationContext, AllocationMethod


class PlanFitness:
    """KL(full || plan) per token on fixed windows; reference log-probs computed once."""

    def __init__(self, model, windows: torch.Tensor, token_policy: dict, batch_size: int = 8):
        from .patching import apply
        from .plan import full_plan

        self.model, self.windows, self.batch_size = model, windows, batch_size
        self.token_policy = token_policy
        self.cache: dict[tuple[tuple[int, ...], int], float] = {}
        with apply(model, full_plan(model)):
            self.ref: list[Reference] = references(model, windows, batch_size)  # per batch, on the model's device

    def __call__(self, ks: list[int], n_windows: int) -> float:
        key = (tuple(ks), n_windows)
        if key not in self.cache:
            self.cache[key] = self._score(ks, n_windows)
        return self.cache[key]

    def _score(self, ks: list[int], n_windows: int) -> float:
        from .patching import apply
        from .plan import make_plan

        plan = make_plan(self.model, list(ks), token_policy=dict(self.token_policy), method="search")
        with apply(self.model, plan, count_experts=False):
            return mean_kl(self.model, self.windows[:n_windows], self.ref, self.batch_size)


def mutate(ks: list[int], k_values: list[int], rng: random.Random, moves: int) -> list[int]:
    """Move one activation between two random layers, `moves` times (the budget is unchanged)."""
    lo, hi = min(k_values), max(k_values)
    out = list(ks)
    for _ in range(moves):
        down = [i for i, k in enumerate(out) if k > lo]
        up = [i for i, k in enumerate(out) if k < hi]
        pairs = [(i, j) for i in down for j in up if i != j]
        if not pairs:
            break
        i, j = pairs[rng.randrange(len(pairs))]
        out[i] -= 1
        out[j] += 1
    return out


def search_allocation(fitness: PlanFitness, start: list[int], k_values: list[int], *, generations: int = 12,
                      offspring: int = 8, survivors: int = 2, low_windows: int = 4, high_windows: int = 16,
                      max_moves: int = 2, seed: int = 0, progress: bool = True) -> tuple[list[int], dict]:
    """(best allocation, history). k_values must be contiguous (moves change a layer's k by one)."""
    rng = random.Random(seed)
    parent = list(start)
    f_parent = fitness(parent, high_windows)
    history = {"start": parent, "start_fitness": f_parent, "accepted": []}
    bar = tqdm(range(generations), desc="searching plans", disable=not progress, leave=False)
    for gen in bar:
        kids = []
        for _ in range(20 * offspring):  # bounded: a small model may have fewer distinct neighbours
            kid = mutate(parent, k_values, rng, rng.randint(1, max_moves))
            if kid != parent and kid not in kids:
                kids.append(kid)
                if len(kids) == offspring:
                    break
        if not kids:
            break  # nothing can move (every layer at a bound)
        kids.sort(key=lambda k: (fitness(k, low_windows), k))
        best = min(kids[:survivors], key=lambda k: (fitness(k, high_windows), k))
        f_best = fitness(best, high_windows)
        if f_best < f_parent:
            parent, f_parent = best, f_best
            history["accepted"].append({"generation": gen, "ks": best, "fitness": f_best})
        bar.set_postfix(kl=f"{f_parent:.5f}")
    history.update(final=parent, final_fitness=f_parent, evaluations=len(fitness.cache))
    return parent, history


# registered in methods.py, after the built-in methods (the order the CLI lists them in)
class Search(AllocationMethod):
    name, label = "search", "search"
    needs_model, needs_windows, in_run = True, True, False
    guarded = True
    summary = "end-to-end (1+lambda) search from the dp plan (with --profile) or uniform, scored by KL on calibration text (needs the model)"
    generations, offspring, low_windows, high_windows = 12, 8, 4, 16

    def allocate(self, ctx: AllocationContext) -> list[int]:
        from .policies import get_policy

        if ctx.profile is not None:
            start = allocators.dp_allocate(ctx.profile.sensitivity, ctx.k_values, ctx.budget)
            ctx.meta["search_start"] = "dp"
        else:
            start = allocators.uniform_allocate(ctx.num_layers, ctx.k_values, ctx.budget)
            ctx.meta["search_start"] = "uniform"
        tp = dict(ctx.token_policy or {"name": "fixed"})
        if get_policy(tp["name"]).calibrated:
            tp = {"name": "fixed"}  # calibrating every candidate would cost a pass each; scored under fixed
        ctx.meta["search_scored_policy"] = tp["name"]
        n_high = min(self.high_windows, len(ctx.windows))
        fit = PlanFitness(ctx.model, ctx.windows[:n_high], tp)
        ks, hist = search_allocation(fit, start, ctx.k_values, seed=ctx.seed, progress=ctx.progress,
                                     high_windows=n_high, low_windows=min(self.low_windows, n_high),
                                     generations=self.generations, offspring=self.offspring)
        ctx.meta["search"] = hist
        return ks
