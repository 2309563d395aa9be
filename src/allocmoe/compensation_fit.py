"""Fitting dropped-expert compensation: the maps of compensation_maps.py from calibration text.

For a plan and calibration windows we fit, for every MoE layer l and kept count c in [1, K_l - 1] that occurs
under the plan's token policy, the low-rank map delta_{l,c}(x) = (x - mu) A B + b [+ router-feature lookup]
predicting r = y_full - y_kept, what the dropped experts would have added (see compensation_maps.py).

Router features (`router_features=True`, the default): also a per-dropped-expert vector C[e] scaled by its
router probability, fitted jointly with the map (H multiply-adds per dropped expert, counted in the FLOPs
cap, so the rank is a little lower). On the built-in model it adds 2-3 points of recovered loss at equal
FLOPs; `router_features=False` gives the plain affine map.

Fitting (`fit_compensation`) streams calibration batches into float64 accumulators per (layer, count):
n, sum z, sum r, Z^T Z, Z^T R with z = x (or [x, p] with router features). From them: centred
covariances, W_ols = (Czz + lam I)^-1 Czr with lam = ridge * trace(Cxx) / H (ridge is relative to the
mean input variance, default DEFAULT_RIDGE = 0.1; the lookup part gets at least FEATURE_RIDGE), then the
reduced-rank solution W_R = W_ols V_R V_R^T where V_R are the top-R eigenvectors of W_ols^T Cxx W_ols (the
right singular directions of the fitted values), so A = W_ols V_R and B = V_R^T; b = mean r; the lookup C
is then refitted on what the rank-R part leaves.
Where the inputs come from (`mode`):
- "teacher": one pass with the plan applied, but each experts call's output is replaced by the full
  top-K output, so every layer sees the full model's states;
- "sequential" (default): layer by layer on the budgeted model's own states, with the compensation of
  the earlier layers installed (pass l stops right after layer l: about (L + 1) / 2 forward passes).
`fit_best` fits both and keeps the one with the lower KL to the full model on held-out calibration
windows (recorded in `meta["selection"]`). Two variants measured worse were removed (their numbers are in
docs/results.md): a "trajectory" target (the residual-stream gap after layer l) and a rank truncation in
the full model's empirical Fisher metric.

The FLOPs cap. With `rank="auto"` (default) each layer gets the largest rank <= max_rank whose measured
cost per token (on the calibration windows: fraction of compensated tokens x (2 R H + lookups x H)) stays
<= flops_fraction (default 10%) of the expert multiply-adds the plan saves per token in that layer
((K - mean kept count) x expert_macs_per_pair). An explicit integer rank that would break this cap in some
layer is REFUSED with a one-line PlanError naming the layer and its largest allowed rank; to go over the
cap pass a larger `flops_fraction` (values above 0.1 emit a UserWarning, and `flops_fraction=None` removes
the cap, also with a warning). The cap actually used is stored in the file.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

import torch
from torch import nn

from .adapters import find_moe_layers
from .compensation_maps import (Compensation, CompensationHandle, CountMap, dropped_experts, expert_macs_per_pair,
                                experts_call_args, install, model_hidden_size, router_logits_hook)
from .divergence import Reference, batches, mean_kl, model_device, references
from .errors import DataError, PlanError, UnsupportedModelError
from .models import weights_loaded
from .patching import apply
from .plan import Plan

DEFAULT_FLOPS_FRACTION = 0.1
DEFAULT_MAX_RANK = 32
# relative ridge (x the mean input variance). 0.1 is what `allocate --compensate` and the main job have always
# fitted with (planning.py used to pass it explicitly while this module documented 1e-2); one default now
DEFAULT_RIDGE = 0.1
FEATURE_RIDGE = 0.1
DEFAULT_MIN_TOKENS = 32
MODES = ("teacher", "sequential")

__all__ = ["fit_compensation", "fit_best", "kl_to_full", "MODES", "DEFAULT_RIDGE", "DEFAULT_FLOPS_FRACTION"]


def _full_output(layer, h: torch.Tensor) -> torch.Tensor:
    """The stock routed output with the full top-K (no plan), for flattened h [T, H]."""
    # called from forward hooks: offloaded (accelerate) weights are loaded only around the modules' own forwards
    with weights_loaded(layer.router), weights_loaded(layer.experts):
        out = type(layer.router).forward(layer.router, h)
        if not isinstance(out, (tuple, list)) or len(out) < 3:
            raise UnsupportedModelError(
                f"{layer.name}: the router does not return (logits, weights, index); compensation cannot be fitted")
        weights, index = out[1], out[2]
        return type(layer.experts).forward(layer.experts, h, index, weights)


def _progress(iterable, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr)


class _Stop(Exception):
    """Raised from a hook to end a forward pass early (sequential fitting)."""


class _Acc:
    """float64 sufficient statistics of (z, r) for one (layer, count); z = x, or [x, d] with router
    features d [E] (the dropped experts' probabilities, scattered)."""

    def __init__(self, H: int, E: int = 0):
        self.H, self.E = H, E
        self.n = 0
        self.nnz = 0  # dropped experts looked up (router features), summed over tokens
        self.sx = torch.zeros(H + E, dtype=torch.float64)
        self.sr = torch.zeros(H, dtype=torch.float64)
        self.xx = torch.zeros(H + E, H + E, dtype=torch.float64)
        self.xr = torch.zeros(H + E, H, dtype=torch.float64)

    def add(self, x: torch.Tensor, r: torch.Tensor, d: torch.Tensor | None = None) -> None:
        x, r = x.detach().to(torch.float64).cpu(), r.detach().to(torch.float64).cpu()
        if self.E:
            d = d.detach().to(torch.float64).cpu()
            self.nnz += int((d != 0).sum())
            x = torch.cat([x, d], 1)
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sr += r.sum(0)
        self.xx += x.T @ x
        self.xr += x.T @ r


class _LayerStats:
    def __init__(self, H: int, K: int, E: int = 0):
        self.H, self.K, self.E = H, K, E
        self.acc: dict[int, _Acc] = {}
        self.count_hist = torch.zeros(K + 1 + 64, dtype=torch.long)  # tokens per kept count (real only)

    def add(self, x: torch.Tensor, r: torch.Tensor, counts: torch.Tensor, d: torch.Tensor | None = None) -> None:
        counts = counts.reshape(-1)
        hist = torch.bincount(counts.clamp(max=self.count_hist.numel() - 1).cpu(), minlength=self.count_hist.numel())
        self.count_hist += hist
        for c in torch.unique(counts).tolist():
            if 1 <= c < self.K:
                sel = (counts == c).nonzero().squeeze(1)
                self.acc.setdefault(c, _Acc(self.H, self.E)).add(x[sel], r[sel], None if d is None else d[sel])

    @property
    def real_tokens(self) -> int:
        return int(self.count_hist[1:].sum())

    @property
    def mean_count(self) -> float:
        n = self.real_tokens
        ar = torch.arange(self.count_hist.numel(), dtype=torch.float64)
        return float((self.count_hist.double() * ar)[1:].sum() / n) if n else float(self.K)


def _reduce_rank(W: torch.Tensor, cxx: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-R version A B of W [H, H] in squared error for inputs with covariance cxx: A = W V, B = V^T,
    V the top-R eigenvectors of W^T Cxx W."""
    fitted = W.T @ cxx @ W  # covariance of the fitted values (n x) -> eigenvectors = right singular dirs
    fitted = (fitted + fitted.T) / 2
    evals, evecs = torch.linalg.eigh(fitted)
    V = evecs[:, torch.argsort(evals, descending=True)[:rank]]  # [H, R]
    return W @ V, V.T


def _solve(acc: _Acc, rank: int, ridge: float) -> CountMap:
    """Ridge least squares on the centred accumulators, then the rank-R truncation of the x part
    (`_reduce_rank`); with router features the per-expert lookup is refitted on what the rank-R x part
    leaves."""
    n, H, E = acc.n, acc.H, acc.E
    mz, mr = acc.sx / n, acc.sr / n
    czz = acc.xx - n * torch.outer(mz, mz)
    czr = acc.xr - n * torch.outer(mz, mr)
    lam_x = ridge * float(torch.trace(czz[:H, :H])) / H + 1e-12
    if E == 0:
        W = torch.linalg.solve(czz + lam_x * torch.eye(H, dtype=torch.float64), czr)  # [H, H]
        A, B = _reduce_rank(W, czz, rank)
        return CountMap(mu=mz.float(), A=A.float().contiguous(), B=B.float().contiguous(), b=mr.float())
    cdd = czz[H:, H:]
    # the per-expert lookup sees few tokens for rarely dropped experts: at least a relative ridge of 0.1
    # there (weaker ridges gave huge, cancelling coefficients on tiny DeepSeek-V3 models)
    lam_d = max(ridge, FEATURE_RIDGE) * float(torch.trace(cdd)) / E + 1e-12
    lam = torch.cat([torch.full((H,), lam_x, dtype=torch.float64), torch.full((E,), lam_d, dtype=torch.float64)])
    W = torch.linalg.solve(czz + torch.diag(lam), czr)  # [H + E, H]
    A, B = _reduce_rank(W[:H], czz[:H, :H], rank)
    WR = A @ B
    C = torch.linalg.solve(cdd + lam_d * torch.eye(E, dtype=torch.float64), czr[H:] - czz[H:, :H] @ WR)
    return CountMap(mu=mz[:H].float(), A=A.float().contiguous(), B=B.float().contiguous(), b=mr.float(),
                    C=C.float().contiguous(), dm=mz[H:].float())


def _layer_maps(st: _LayerStats, *, rank, max_rank: int, ridge: float, flops_fraction: float | None,
                min_tokens: int, macs_pair: int, l: int, layer_name: str) -> tuple[dict[int, CountMap], dict]:
    H, K = st.H, st.K
    counts = sorted(c for c, a in st.acc.items() if a.n >= min_tokens)
    real = st.real_tokens
    comp_tokens = sum(st.acc[c].n for c in counts)
    p_comp = comp_tokens / real if real else 0.0
    lookups = sum(st.acc[c].nnz for c in counts) / comp_tokens if comp_tokens else 0.0  # per compensated token
    saved = max(0.0, K - st.mean_count) * macs_pair  # expert MACs the plan saves per token in this layer
    if flops_fraction is None or p_comp == 0:
        cap = H if p_comp > 0 else 0
    else:
        cap = int(math.floor((flops_fraction * saved / p_comp - lookups * H) / (2 * H)))
    cap = max(0, min(cap, H))
    if rank == "auto":
        R = min(cap, max_rank)
    else:
        R = int(rank)
        if p_comp > 0 and R > cap:
            raise PlanError(
                f"compensation rank {R} in MoE layer {l} ({layer_name}) costs "
                f"{(2 * R + lookups) * H * p_comp:.0f} multiply-adds per token, over "
                f"{'' if flops_fraction is None else f'{flops_fraction:.0%} of '}the {saved:.0f} the plan saves "
                f"there; the largest allowed rank is {cap} (pass rank='auto' or a larger flops_fraction)")
    maps = {}
    if R >= 1:
        for c in counts:
            maps[c] = _solve(st.acc[c], min(R, max(1, st.acc[c].n - 1)), ridge)
    info = {"rank": R if maps else 0, "rank_cap": cap, "counts": {str(c): st.acc[c].n for c in sorted(st.acc)},
            "real_tokens": real, "mean_kept": st.mean_count, "compensated_fraction": p_comp if maps else 0.0,
            "saved_expert_macs_per_token": saved,
            "lookups_per_compensated_token": lookups,
            "comp_macs_per_token": ((2 * R + lookups) * H * p_comp) if maps else 0.0}
    return maps, info


def fit_compensation(model: nn.Module, plan, windows: torch.Tensor, *, rank: int | str = "auto",
                     ridge: float = DEFAULT_RIDGE, mode: str = "sequential", batch_size: int = 8,
                     max_rank: int = DEFAULT_MAX_RANK, flops_fraction: float | None = DEFAULT_FLOPS_FRACTION,
                     min_tokens: int = DEFAULT_MIN_TOKENS, router_features: bool = True,
                     progress: bool = True) -> Compensation:
    """Fit per-(layer, kept count) low-rank maps for `plan` on calibration `windows` [N, S] (token ids).

    mode "teacher": inputs are the full model's states (one pass). "sequential": each layer on the
    budgeted model's own states with the earlier layers' compensation installed (a pass per layer,
    each stopping after its layer). `rank`: "auto" (largest within the FLOPs cap, <= max_rank) or an
    integer used in every compensated layer (refused with PlanError where it breaks the cap).
    `ridge` is relative to the mean input variance. `router_features`: also add, per
    dropped expert e (`dropped_experts`: ranked by the router logits the router returns anyway), its
    router probability times a fitted vector C[e] (H multiply-adds per dropped expert, counted in the
    cap, so the rank is lower). Counts seen on fewer than `min_tokens` calibration
    tokens get no map. The model must not have a plan applied (this applies `plan` itself).
    """
    if mode not in MODES:
        raise PlanError(f"unknown compensation mode {mode!r} (choose from {', '.join(MODES)})")
    if rank != "auto" and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise PlanError(f"compensation rank must be 'auto' or an integer >= 1, got {rank!r}")
    if flops_fraction is None:
        warnings.warn("compensation FLOPs cap disabled (flops_fraction=None): compensation may cost more than "
                      "the expert work the plan saves", UserWarning, stacklevel=2)
    elif flops_fraction > DEFAULT_FLOPS_FRACTION:
        warnings.warn(f"compensation FLOPs cap {flops_fraction:.0%} of the saved expert FLOPs is above the "
                      f"{DEFAULT_FLOPS_FRACTION:.0%} allocmoe keeps by default", UserWarning, stacklevel=2)
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.numel() == 0:
        raise DataError("calibration windows must be a non-empty [N, S] tensor of token ids")
    plan = Plan.load(plan)
    layers = find_moe_layers(model)
    plan.check_model(layers, model)
    H = model_hidden_size(model, layers)
    L = len(layers)
    E_of = [int(l.num_experts) if router_features else 0 for l in layers]
    stats = [_LayerStats(H, l.top_k, e) for l, e in zip(layers, E_of)]
    logits_store: dict[int, torch.Tensor] = {}

    def features(l: int, index: torch.Tensor, T: int) -> torch.Tensor | None:
        lg = logits_store.pop(l, None)
        if not router_features:
            return None
        if lg is None or lg.shape[0] != T:
            raise PlanError(f"MoE layer {l}: router features need the router's logits [T, E]; this family's "
                            "router does not return them (fit without router_features)")
        di, dw = dropped_experts(lg, index, layers[l].top_k)
        return torch.zeros(T, E_of[l], dtype=torch.float32, device=dw.device).scatter_(
            1, di.clamp(min=0), dw.float() * (di >= 0))
    macs_pair = [expert_macs_per_pair(l) for l in layers]
    maps: list[dict[int, CountMap]] = [{} for _ in layers]
    infos: list[dict] = [{} for _ in layers]
    comp = Compensation(maps, hidden_size=H, top_k=[l.top_k for l in layers], expert_macs=macs_pair)
    kw = dict(rank=rank, max_rank=max_rank, ridge=ridge, flops_fraction=flops_fraction, min_tokens=min_tokens)
    dev = model_device(model)
    was_training = model.training
    model.eval()

    def collect_hook(l: int, replace: bool, stop: bool):
        layer = layers[l]

        def hook(module, args, kwargs, output):
            h, index, _ = experts_call_args(args, kwargs)
            x = h.reshape(-1, h.shape[-1])
            y_full = _full_output(layer, x).view(output.shape)
            counts = (index >= 0).sum(-1).reshape(-1)
            d = features(l, index, x.shape[0])
            real = counts >= 1
            r = (y_full - output).reshape(-1, x.shape[-1])
            if not bool(real.all()):
                x, r, counts = x[real], r[real], counts[real]
                d = None if d is None else d[real]
            stats[l].add(x, r, counts, d)
            if stop:
                raise _Stop()
            return y_full if replace else None

        return hook

    router_hooks = [layer.router.register_forward_hook(router_logits_hook(logits_store, l))
                    for l, layer in enumerate(layers)] if router_features else []
    try:
        with torch.no_grad():
            if mode == "teacher":
                handle = apply(model, plan)
                hooks = [layers[l].experts.register_forward_hook(collect_hook(l, True, False), with_kwargs=True)
                         for l in range(L)]
                try:
                    for ids in _progress(list(batches(windows, batch_size)), "compensation (teacher)", progress):
                        model(input_ids=ids.to(dev), use_cache=False)
                finally:
                    for hk in hooks:
                        hk.remove()
                    handle.remove()
                for l in range(L):
                    maps[l], infos[l] = _layer_maps(stats[l], macs_pair=macs_pair[l], l=l, layer_name=layers[l].name,
                                                    **kw)
            else:  # sequential
                blocks = list(batches(windows, batch_size))
                steps = _progress(range(L * len(blocks)), f"compensation ({mode})", progress)
                it = iter(steps)
                for l in range(L):
                    for ids in blocks:
                        handle = apply(model, plan)
                        comp_handle = CompensationHandle(model, comp, layers).install()  # maps[l:] still empty
                        hk = layers[l].experts.register_forward_hook(collect_hook(l, False, True), with_kwargs=True)
                        try:
                            model(input_ids=ids.to(dev), use_cache=False)
                        except _Stop:
                            pass
                        finally:
                            hk.remove()
                            comp_handle.remove()
                            handle.remove()
                        next(it, None)
                    maps[l], infos[l] = _layer_maps(stats[l], macs_pair=macs_pair[l], l=l, layer_name=layers[l].name,
                                                    **kw)
                if hasattr(steps, "close"):
                    steps.close()
    finally:
        for hk in router_hooks:
            hk.remove()
        model.train(was_training)

    comp_macs = sum(i["comp_macs_per_token"] for i in infos)
    saved = sum(i["saved_expert_macs_per_token"] for i in infos)
    comp.meta = {
        "mode": mode, "router_features": router_features, "ridge": ridge, "rank": rank, "max_rank": max_rank,
        "flops_fraction": flops_fraction,
        "min_tokens": min_tokens, "calibration_tokens": int(windows.numel()), "batch_size": batch_size,
        "plan": {"ks": plan.ks, "token_policy": plan.token_policy, "renormalize": plan.renormalize,
                 "method": plan.method},
        "model": plan.model,
        "layers": infos,
        "comp_macs_per_token": comp_macs,
        "saved_expert_macs_per_token": saved,
        "comp_over_saved": comp_macs / saved if saved else 0.0,
    }
    return comp


def kl_to_full(model: nn.Module, plan, comp: Compensation | None, windows: torch.Tensor, *, batch_size: int = 8,
               reference: list[Reference] | None = None) -> float:
    """Mean per-token KL(full || plan [+ comp]) in nats on `windows` (use held-out calibration windows);
    `reference`: the full model's side (`divergence.references(model, windows, batch_size, device="cpu")`
    on the unpatched model), when several candidates are scored on the same windows."""
    if reference is None:
        reference = references(model, windows, batch_size, device="cpu")
    with apply(model, plan):
        if comp is None:
            return mean_kl(model, windows, reference, batch_size)
        with install(model, comp):
            return mean_kl(model, windows, reference, batch_size)


def fit_best(model: nn.Module, plan, windows: torch.Tensor, *, holdout: torch.Tensor | int | None = None,
             modes: tuple[str, ...] = ("teacher", "sequential"), batch_size: int = 8, progress: bool = True,
             refit: bool = False, ridges: tuple[float, ...] | None = None, prune: bool = True,
             **fit_kw: Any) -> Compensation:
    """Fit every mode in `modes` and keep the one with the lower KL to the full model on held-out windows.

    `holdout`: calibration windows kept out of fitting (a tensor), or how many of the last windows of
    `windows` to hold out (default: an eighth, at least one). Never pass evaluation text here. The
    scores (and the plan's KL without compensation) are recorded in `meta["selection"]`. The result is
    the winner as fitted on the non-held-out windows; `refit=True` refits the winning mode on all of
    `windows` (plus a holdout tensor, if given). `ridges`: also choose the ridge among these on the same
    held-out KL (default: just `ridge`, or the default). `prune`: then keep a layer's maps only where they
    lower the held-out KL beyond noise (compensation_select.py; `meta["kept_layers"]`). Other keywords go to
    `fit_compensation`.
    """
    if isinstance(holdout, torch.Tensor):
        fit_w, held = windows, holdout
    else:
        n_held = max(1, windows.shape[0] // 8) if holdout is None else int(holdout)
        if windows.shape[0] - n_held < 1:
            raise DataError(f"need more than {n_held} calibration windows to hold {n_held} out")
        fit_w, held = windows[:-n_held], windows[-n_held:]
    full = references(model, held, batch_size, device="cpu")  # on CPU: many candidates share it
    scores = {"none": kl_to_full(model, plan, None, held, batch_size=batch_size, reference=full)}
    fitted = {}
    ridges = tuple(ridges) if ridges else (fit_kw.pop("ridge", DEFAULT_RIDGE),)
    fit_kw.pop("ridge", None)
    for m in modes:
        for rd in ridges:
            key = m if len(ridges) == 1 else f"{m}@ridge={rd:g}"
            fitted[key] = fit_compensation(model, plan, fit_w, mode=m, ridge=rd, batch_size=batch_size,
                                           progress=progress, **fit_kw)
            scores[key] = kl_to_full(model, plan, fitted[key], held, batch_size=batch_size, reference=full)
    best = min(fitted, key=lambda k: scores[k])
    comp = fitted[best]
    if refit:
        all_w = torch.cat([windows, holdout]) if isinstance(holdout, torch.Tensor) else windows
        comp = fit_compensation(model, plan, all_w, mode=comp.meta["mode"], ridge=comp.meta["ridge"],
                                batch_size=batch_size, progress=progress, **fit_kw)
    comp.meta["selection"] = {"kl": scores, "chosen": comp.meta["mode"], "ridge": comp.meta["ridge"],
                              "holdout_tokens": int(held.numel()), "refit": refit,
                              "improves_on_plan": scores[best] < scores["none"]}
    if prune:
        from .compensation_select import prune_layers

        comp = prune_layers(model, plan, comp, held, full, batch_size)
        comp.meta["selection"]["kl_kept_layers"] = kl_to_full(model, plan, comp, held, batch_size=batch_size,
                                                              reference=full)
    return comp
