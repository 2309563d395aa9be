"""Apply a plan to a Hugging Face MoE model in place, reversibly, with real compute savings and counting.

For every MoE block we replace two *instance* forwards (the classes are untouched):
- the router's: compute the family's scores (adapters), let the token policy pick a per-token prefix of
  the best experts, and return (logits, weights[T, M], index[T, M]) where dropped slots have index -1;
- the experts': run only real (token, expert) pairs. When no slot is dropped it calls the stock experts
  forward as is (whatever `config._experts_implementation` selects), so a full-K plan is bitwise
  identical to the original model. Otherwise it compacts the pairs, runs the stock experts forward on
  them as P "tokens" with top-1 each, and scatter-adds the results back, so a dropped slot costs no
  matmul at all (a zero weight would still cost one).

The fixed policy with native weights calls the stock router with `top_k = K_l`, which reproduces the
family's own selection order and weights exactly. Leaving the context (or `remove()`) deletes the
instance overrides and restores the original behaviour bit for bit.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import MoELayer, find_moe_layers
from . import distributed, experts_fast, policies
from .compensation_maps import install as install_compensation
from .errors import PlanError, SettingsError
from .plan import Plan

_HANDLE_ATTR = "_allocmoe_handle"


@dataclass
class _BatchContext:
    """Per-forward-call state shared by all MoE layers: which flattened tokens are real (not padding)."""

    valid: torch.Tensor | None = None  # bool [B*S] or None (= all real)
    depth: int = 0


@dataclass
class _LayerState:
    layer: MoELayer
    k: int
    params: dict
    policy: policies.TokenPolicy
    renorm: str = "native"
    pairs_last: int = 0
    tokens_last: int = 0
    pairs_total: int = 0
    tokens_total: int = 0
    expert_counts: torch.Tensor | None = None  # cumulative pairs per expert
    dense: bool = True  # set by the router: no slot dropped and no padding in this call
    valid: torch.Tensor | None = None
    last_index: torch.Tensor | None = None


class AppliedPlan:
    """Handle returned by `apply`: counts, and `remove()` / context manager to undo the patch.

    The handle owns the patched state. Tools that probe one layer at a time (profiling, lexi) use
    `override_layer`; counting and the kernel for sparse calls are the handle's settings
    (`count_experts`, `sparse_path`), read on every call.
    """

    def __init__(self, model: nn.Module, plan: Plan, layers: list[MoELayer], record: bool = False,
                 count_experts: bool = True, sparse_path: str | None = None, compensation=None):
        self.model, self.plan, self.layers = model, plan, layers
        self.compensation = compensation  # fitted dropped-expert compensation (compensation_maps.py), or None
        self._comp_handle = None
        self.record = record  # keep each layer's last selected index [T, M] (tests, analysis)
        self.count_experts = count_experts  # per-expert load (cheap, but off for benchmarks)
        self.sparse_path = experts_fast.sparse_path_or_default(sparse_path)
        self.ctx = _BatchContext()
        tp = plan.token_policy
        self.policy = policies.get_policy(tp["name"])
        self.min_k = int(tp.get("min_k", 1))
        self._states = [
            _LayerState(layer=l, k=k, params={**tp, **row}, policy=self.policy, renorm=plan.renormalize)
            for l, k, row in zip(layers, plan.ks, plan.layers)
        ]
        self._hooks: list = []
        self._saved: list[tuple[nn.Module, str, object]] = []
        self._replicas = None  # sharded model under torchrun: ranks seeing each token (counts are all-reduced)
        self._reduced_experts: list = []  # per layer: the globally reduced per-expert counts so far
        self.active = False

    # --- install / remove ---------------------------------------------------------------------
    def _override(self, module: nn.Module, fn) -> None:
        # remember an instance-level forward if one was already there (e.g. another tool's patch); under
        # accelerate's hooks (device_map / offload) the inner `_old_forward` is replaced so the hook still runs
        slot = _forward_slot(module)
        self._saved.append((module, slot, module.__dict__.get(slot, None)))
        setattr(module, slot, types.MethodType(fn, module))

    def install(self) -> "AppliedPlan":
        for st in self._states:
            self._override(st.layer.router, _make_router_forward(self, st))
            stock = getattr(st.layer.experts, _forward_slot(st.layer.experts))
            self._override(st.layer.experts, _make_experts_forward(self, st, stock))
        entry_points = {id(self.model): self.model}
        base = getattr(self.model, "base_model", None)
        if isinstance(base, nn.Module):
            entry_points[id(base)] = base
        for m in entry_points.values():
            self._hooks.append(m.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._hooks.append(m.register_forward_hook(self._post_hook, always_call=True))
        if self.compensation is not None:
            self._comp_handle = install_compensation(self.model, self.compensation)
        setattr(self.model, _HANDLE_ATTR, self)
        # sharded model under torchrun: counts become global after every call (see distributed.py)
        self._replicas = distributed.count_replicas(self.model)
        self._reduced_experts = [None] * len(self._states)
        self.active = True
        return self

    def remove(self) -> None:
        if not self.active:
            return
        for h in self._hooks:
            h.remove()
        if self._comp_handle is not None:
            self._comp_handle.remove()
            self._comp_handle = None
        for module, name, old in reversed(self._saved):
            if old is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = old
        self._hooks.clear()
        self._saved.clear()
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)
        self.active = False

    def __enter__(self) -> "AppliedPlan":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # --- forward hooks: padding mask and per-call counters ----------------------------------------
    def _pre_hook(self, module, args, kwargs):
        if self.ctx.depth == 0:
            for st in self._states:
                st.pairs_last = st.tokens_last = 0
            self.ctx.valid = _real_token_mask(args, kwargs)
        self.ctx.depth += 1

    def _post_hook(self, module, args, output):
        self.ctx.depth = max(0, self.ctx.depth - 1)
        if self.ctx.depth == 0:
            self.ctx.valid = None
            if self._replicas is not None:
                self._reduce_counts()

    def _reduce_counts(self) -> None:
        """Sharded model: replace this call's per-rank counts by the global ones (one collective), so
        `counts()` gives the single-process figures on every rank."""
        st, L = self._states, len(self._states)
        deltas = []
        for i, s in enumerate(st):
            if s.expert_counts is None:
                deltas.append(torch.zeros(s.layer.num_experts, dtype=torch.int64))
            else:
                prev = self._reduced_experts[i]
                deltas.append(s.expert_counts.to(torch.int64).cpu() - (prev if prev is not None else 0))
        local = torch.tensor([s.pairs_last for s in st] + [s.tokens_last for s in st], dtype=torch.int64)
        flat = distributed.all_reduce_counts(torch.cat([local, *deltas]), self._replicas)
        pairs, tokens, off = flat[:L].tolist(), flat[L:2 * L].tolist(), 2 * L
        for i, s in enumerate(st):
            s.pairs_total += pairs[i] - s.pairs_last
            s.tokens_total += tokens[i] - s.tokens_last
            s.pairs_last, s.tokens_last = pairs[i], tokens[i]
            E = s.layer.num_experts
            d, off = flat[off:off + E], off + E
            if s.expert_counts is not None or bool(d.any()):
                dev = s.expert_counts.device if s.expert_counts is not None else torch.device("cpu")
                prev = self._reduced_experts[i]
                self._reduced_experts[i] = (prev if prev is not None else torch.zeros(E, dtype=torch.int64)) + d
                s.expert_counts = self._reduced_experts[i].to(dev)

    # --- per-layer access (profiling, lexi, calibration, tests) ---------------------------------
    @contextmanager
    def override_layer(self, index: int, k: int | None = None, renormalize: str | None = None,
                       token_policy: str | None = None, params: dict | None = None):
        """Temporarily run MoE layer `index` at `k` experts, and/or with another weighting, token policy
        (by name; `params` holds its knob, e.g. {"threshold": tau})."""
        st = self._states[index]
        saved = st.k, st.renorm, st.policy, st.params
        if k is not None:
            if not 1 <= k <= st.layer.num_experts:
                raise PlanError(f"layer {index}: k={k} is out of range [1, {st.layer.num_experts}]")
            st.k = int(k)
        if renormalize is not None:
            st.renorm = renormalize
        if token_policy is not None:
            st.policy = policies.get_policy(token_policy)
        if params is not None:
            st.params = {**st.params, **params}
        try:
            yield self
        finally:
            st.k, st.renorm, st.policy, st.params = saved

    def last_selection(self, index: int) -> torch.Tensor | None:
        """Expert index [T, M] chosen in layer `index` by the last call (-1 = dropped); needs record=True."""
        if not self.record:
            raise SettingsError("last_selection needs the plan applied with record=True", param="record")
        return self._states[index].last_index

    # --- counts -------------------------------------------------------------------------------
    def reset_counts(self) -> None:
        if self._comp_handle is not None:
            self._comp_handle.reset_counts()
        for st in self._states:
            st.pairs_last = st.tokens_last = st.pairs_total = st.tokens_total = 0
            st.expert_counts = None
        self._reduced_experts = [None] * len(self._states)

    def counts(self) -> dict:
        """Measured (token, expert) pairs per MoE layer, for the last forward call and cumulatively."""
        def summary(pairs: list[int], tokens: list[int]) -> dict:
            n = max(tokens) if tokens else 0
            return {
                "tokens": n,
                "pairs_per_layer": pairs,
                "activations_per_token_per_layer": [p / t if t else 0.0 for p, t in zip(pairs, tokens)],
                "activations_per_token": (sum(pairs) / n) if n else 0.0,
            }

        out = {
            "last": summary([s.pairs_last for s in self._states], [s.tokens_last for s in self._states]),
            "cumulative": summary([s.pairs_total for s in self._states], [s.tokens_total for s in self._states]),
            "original_activations_per_token": sum(l.top_k for l in self.layers),
        }
        if self._comp_handle is not None:
            # compensation work actually executed, beside the expert activations (1 MAC = 2 FLOPs)
            f = self._comp_handle.flops()
            out["compensation"] = {
                "macs_per_token": f["macs_per_token"], "flops_per_token": f["flops_per_token"],
                "macs_per_token_per_layer": f["macs_per_token_per_layer"], "tokens": f["tokens"],
                # the same work in units of one (token, expert) pair of each layer
                "expert_pair_equivalents_per_token": sum(
                    m / p for m, p in zip(f["macs_per_token_per_layer"], f["expert_macs_per_pair"]) if p),
            }
        return out

    def expert_load(self) -> list[list[int]]:
        """Cumulative pairs per (layer, expert)."""
        return [
            (st.expert_counts.tolist() if st.expert_counts is not None else [0] * st.layer.num_experts)
            for st in self._states
        ]


def _forward_slot(module: nn.Module) -> str:
    """The attribute holding the forward to override: accelerate's hook wraps `_old_forward` in `forward`
    (loading offloaded weights before the call), so under it the inner one is replaced."""
    return "_old_forward" if "_old_forward" in module.__dict__ and hasattr(module, "_hf_hook") else "forward"


def _real_token_mask(args, kwargs) -> torch.Tensor | None:
    mask = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    cu = kwargs.get("cu_seq_lens_q")
    if isinstance(cu, torch.Tensor) and cu.numel() and ids is not None and ids.shape[0] == 1:
        # a packed batch (transformers' continuous batching): the requests' query tokens lie end to end in
        # [0, cu[-1]); anything after is padding added for static shapes (CUDA graphs / compile). The KV
        # cache (stale slots included) never reaches the MoE layers, only these query tokens do.
        n_real = int(cu[-1])
        if n_real >= ids.shape[1]:
            return None
        return torch.arange(ids.shape[1], device=ids.device) < n_real
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or ids is None:
        return None
    seq = ids.shape[1]
    valid = mask[:, -seq:].bool().reshape(-1)
    return None if bool(valid.all()) else valid


# --------------------------------------------------------------------------------------------------
# router and experts overrides
# --------------------------------------------------------------------------------------------------


def _make_router_forward(handle: AppliedPlan, st: _LayerState):
    layer = st.layer
    adapter, router = layer.adapter, layer.router
    cls_forward = type(router).forward
    min_k = handle.min_k
    max_k = int(handle.plan.token_policy.get("max_k") or max(layer.top_k, st.k))

    def forward(self, hidden_states, *args, **kwargs):
        T = hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]
        valid = handle.ctx.valid
        if valid is not None and valid.numel() != T:
            valid = None  # called outside the model forward we hooked (e.g. a sub-module); all real
        # read per call: profiling changes k, weighting or policy of one layer at a time
        renorm, policy = st.renorm, st.policy
        if policy.exact and renorm == "native":  # fixed counts + native weights: the stock router
            # exact stock behaviour (selection order, weights, dtypes) with top_k = K_l
            saved = self.top_k
            self.top_k = st.k
            try:
                out = cls_forward(self, hidden_states, *args, **kwargs)
            finally:
                self.top_k = saved
            logits, weights, index = out[0], out[1], out[2]
            if valid is not None:
                index = index.masked_fill(~valid.unsqueeze(1), -1)
        else:
            scores = adapter.scores(self, hidden_states)
            logits = scores.logits
            kk = st.k if policy.exact else max(max_k, st.k)
            vals, ids = policies.sorted_candidates(scores.rank, kk)
            cand = policies.Candidates(vals, ids, valid, rank=scores.rank, raw_weight=scores.weight)
            counts = policy.counts(cand, st.k, st.params, min_k)
            if valid is not None:
                counts = counts.masked_fill(~valid, 0)
            index = policies.prefix_index(ids, counts)
            weights = _mix_weights(adapter, self, scores, index, renorm, layer.top_k)
            weights = weights.to(adapter.weight_dtype(self, hidden_states, logits))
        if handle.record:
            st.last_index = index
        st.dense = valid is None and policy.exact
        st.valid = valid
        st.tokens_last += T if valid is None else int(valid.sum())
        st.tokens_total += T if valid is None else int(valid.sum())
        return logits, weights, index

    return forward


def _topk_mass(scores, original_k: int) -> torch.Tensor:
    """[T, 1]: the summed weight of each token's original top-K experts."""
    topk_idx = torch.topk(scores.rank, k=original_k, dim=-1).indices
    return scores.weight.gather(1, topk_idx).sum(dim=-1, keepdim=True)


def _mix_weights(adapter, router, scores, index, renorm: str, original_k: int) -> torch.Tensor:
    """Mixing weights for the kept slots (0 at dropped slots, which are never computed anyway)."""
    kept = index >= 0
    w = scores.weight.gather(1, index.clamp(min=0)) * kept
    scale = adapter.scaling_factor(router)
    if renorm == "native" and not adapter.renormalises(router):
        return w * scale
    if renorm == "keep-mass" and not adapter.renormalises(router):
        # keep the mass the original top-K would have given this token (arXiv 2609.04575)
        return w * (_topk_mass(scores, original_k) / (w.sum(dim=-1, keepdim=True) + 1e-20)) * scale
    if renorm == "keep-weights":
        # every kept expert keeps the weight it has in the full model: w over the original top-K's mass (for a
        # renormalising family; otherwise this is native). At full K it is the family's own renormalisation;
        # below it the kept weights are not scaled up (docs/results.md: better on the Qwen3-MoE model)
        if not adapter.renormalises(router):
            return w * scale
        return w / (_topk_mass(scores, original_k) + 1e-20) * scale
    # native for renormalising families, 'renorm', and keep-mass for renormalising families (same thing)
    return w / (w.sum(dim=-1, keepdim=True) + 1e-20) * scale


def _make_experts_forward(handle: AppliedPlan, st: _LayerState, stock_forward):
    E = st.layer.num_experts
    sparse_forward = distributed.sparse_forward_for(st.layer.experts, E)  # sharded experts: per-rank kernels

    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        if st.dense:
            n_pairs = top_k_index.numel()
            out = stock_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            per_expert = None
        else:
            # only the real (token, expert) pairs are computed: one sort by expert, one gather, the
            # configured kernel family (grouped / per-expert loop / batched) once, one index_add_ back
            # (see experts_fast; the `reference` path there is the former compact-then-stock path)
            out, n_pairs, per_expert = sparse_forward(
                self, hidden_states, top_k_index, top_k_weights,
                stock_forward=(lambda h, i, w: stock_forward(h, i, w, *args, **kwargs)),
                path=experts_fast.resolve_path(self, handle.sparse_path, top_k_index.numel()))
            n_pairs = int(n_pairs)  # the one host read of the call (counting needs it), after the kernels
        st.pairs_last += n_pairs
        st.pairs_total += n_pairs
        if handle.count_experts:
            c = torch.bincount(top_k_index.reshape(-1), minlength=E) if per_expert is None else per_expert
            st.expert_counts = c if st.expert_counts is None else st.expert_counts + c
        return out

    return forward


def apply(model: nn.Module, plan, *, record: bool = False, count_experts: bool = True,
          sparse_path: str | None = None, compensation=None) -> AppliedPlan:
    """Patch `model`'s routing in place according to `plan` (a Plan, dict or path to plan JSON).

    Returns a handle; use it as a context manager or call `.remove()` to restore the original model.
    `record` keeps each layer's last selection (`handle.last_selection(l)`); `count_experts` keeps the
    per-expert load (`handle.expert_load()`); `sparse_path` picks the kernel for calls with dropped
    slots (see experts_fast; default: $ALLOCMOE_SPARSE_EXPERTS or "follow"). Dropped-expert compensation
    comes from the plan (its referenced file, checked against its sha256) unless `compensation` is given.
    """
    plan = Plan.load(plan)
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise PlanError("a plan is already applied to this model; remove it first (handle.remove())")
    layers = find_moe_layers(model)
    plan.check_model(layers, model)
    comp = compensation if compensation is not None else plan.load_compensation(model)
    return AppliedPlan(model, plan, layers, record=record, count_experts=count_experts, sparse_path=sparse_path,
                       compensation=comp).install()


def applied_plan(model: nn.Module) -> AppliedPlan | None:
    """The handle of the plan currently applied to `model`, if any."""
    return getattr(model, _HANDLE_ATTR, None)
