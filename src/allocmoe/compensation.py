"""Dropped-expert compensation: predict what the dropped experts would have added, with a cheap low-rank map.

Under a budget a token keeps only its best c < K routed experts in a MoE layer. What the dropped experts
would have added, r = y_full - y_kept (y = the routed experts' output, what the experts module returns;
shared experts are untouched), is partly predictable from the block input x. For every MoE layer l and
every kept count c in [1, K_l - 1] that occurs under the plan's token policy we fit a low-rank affine map

    delta_{l,c}(x) = (x - mu) A B + b  [+ sum_{e dropped} p_e (C[e] - ...)]      A [H, R], B [R, H]

by ridge-regularised, reduced-rank least squares on calibration windows, and at inference add
delta_{l,c}(x) to the kept experts' output of every token with kept count c. Tokens with count 0
(padding) or count >= K (nothing dropped) get nothing, so a full-K plan stays bitwise exact.

Router features (`router_features=True`, the default): the bracketed term. The router has already scored
every expert, so which experts a token drops and their router probabilities p_e are known for free (a
top-K over the logits the router returns; `dropped_experts`). Each dropped expert adds p_e C[e], C [E, H]
fitted jointly with the map (a lookup: H multiply-adds per dropped expert, counted in the FLOPs cap, so
the rank is a little lower). On the built-in model it adds 2-3 points of recovered loss at equal FLOPs;
`router_features=False` gives the plain affine map. Without the router logits at hand (`delta(l, x,
counts)` with no `dropped`), the lookup is replaced by its calibration mean.

Fitting (`fit_compensation`) streams calibration batches into float64 accumulators per (layer, count):
n, sum z, sum r, Z^T Z, Z^T R with z = x (or [x, p] with router features). From them: centred
covariances, W_ols = (Czz + lam I)^-1 Czr with lam = ridge * trace(Cxx) / H (ridge is relative to the
mean input variance; the lookup part gets at least 0.1), then the reduced-rank solution
W_R = W_ols V_R V_R^T where V_R are the top-R eigenvectors of W_ols^T Cxx W_ols (the right singular
directions of the fitted values), so A = W_ols V_R and B = V_R^T; b = mean r; the lookup C is then
refitted on what the rank-R part leaves.
Where the inputs come from (`mode`):
- "teacher": one pass with the plan applied, but each experts call's output is replaced by the full
  top-K output, so every layer sees the full model's states;
- "sequential" (default): layer by layer on the budgeted model's own states, with the compensation of
  the earlier layers installed (pass l stops right after layer l: about (L + 1) / 2 forward passes);
- "trajectory" (experimental): like sequential, but the target is the gap between the full model's
  residual stream after layer l and the budgeted one's, so the map also repairs drift from earlier
  layers (one extra, early-stopped full-model pass per layer and batch). On the built-in model it helped
  under uniform top-3 (27.6% of the loss recovered vs 25.0% teacher) but hurt under dp+global (15% vs
  32% sequential), so `fit_best` does not try it unless asked.
`fit_best` fits teacher and sequential and keeps the one with the lower KL to the full model on held-out
calibration windows (recorded in `meta["selection"]`).
`metric="fisher"` makes the rank truncation optimal in the full model's empirical Fisher metric of the
experts output instead of plain squared error (measured worse on the built-in model; off by default).

Cost and the FLOPs cap. Compensation costs 2 R H multiply-adds (x A, then B), plus H per dropped expert
looked up (router features), plus H bias adds per compensated token. A routed expert pair costs `expert_macs_per_pair` multiply-adds (3 H I for gated
experts, read from the experts' 3-D weights). With `rank="auto"` (default) each layer gets the largest
rank <= max_rank whose measured cost per token (on the calibration windows: fraction of compensated
tokens x (2 R H + lookups x H)) stays <= flops_fraction (default 10%) of the expert multiply-adds the plan saves per token
in that layer ((K - mean kept count) x expert_macs_per_pair). An explicit integer rank that would break
this cap in some layer is REFUSED with a one-line PlanError naming the layer and its largest allowed
rank; to go over the cap pass a larger `flops_fraction` (values above 0.1 emit a UserWarning, and
`flops_fraction=None` removes the cap, also with a warning). The cap actually used is stored in the file.

Files: `save(path)` writes safetensors (tensors `l{l}.c{c}.{mu,A,B,b[,C,dm]}`, metadata: format, version,
a JSON header with the model/plan facts, and a sha256 of the content) and returns the file's sha256;
`Compensation.load(path, expected_sha256=None, model=None)` raises FileFormatError (missing,
unreadable, not a compensation file, content checksum wrong), PlanError (file sha256 differs from the
expected one) or ModelMismatchError (does not fit the model), each with a one-line message.

`install(model, comp)` (after `apply(model, plan)`, or on an unpatched model where it does
nothing since every token keeps K) adds the delta with forward hooks on each layer's experts module and
counts the multiply-adds it executes (`handle.flops()`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import find_moe_layers
from .divergence import Reference
from .errors import DataError, FileFormatError, ModelMismatchError, PlanError, UnsupportedModelError
from .patching import apply
from .plan import Plan

FORMAT = "allocmoe-compensation"
VERSION = 1
DEFAULT_FLOPS_FRACTION = 0.1
DEFAULT_MAX_RANK = 32
DEFAULT_RIDGE = 1e-2
FEATURE_RIDGE = 0.1
DEFAULT_MIN_TOKENS = 32
MODES = ("teacher", "sequential", "trajectory")

__all__ = [
    "Compensation", "CompensationHandle", "install", "fit_compensation", "fit_best", "kl_to_full",
    "calibration_residual", "expert_macs_per_pair", "dropped_experts", "MODES",
]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def expert_macs_per_pair(layer) -> int:
    """Multiply-adds of one routed (token, expert) pair: the experts' 3-D weights per expert (3 H I gated)."""
    E = int(layer.num_experts)
    n = sum(p.numel() for p in layer.experts.parameters() if p.dim() == 3)
    if n == 0 or E == 0:  # experts as a ModuleList of MLPs (older layouts): their 2-D weights per expert
        n = sum(p.numel() for p in layer.experts.parameters() if p.dim() == 2)
    return int(round(n / max(E, 1)))


def _model_hidden_size(model, layers) -> int:
    h = getattr(getattr(model, "config", None), "hidden_size", None)
    if h is not None:
        return int(h)
    return int(layers[0].router.weight.shape[-1])


def _experts_args(args, kwargs):
    """(hidden_states, top_k_index, top_k_weights) of an experts call, positional or keyword."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args[:3])
    for name in names[len(vals):]:
        vals.append(kwargs.get(name))
    return vals[0], vals[1], vals[2]


def _full_output(layer, h: torch.Tensor) -> torch.Tensor:
    """The stock routed output with the full top-K (no plan), for flattened h [T, H]."""
    from .models import weights_loaded

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


# --------------------------------------------------------------------------------------------------
# the compensation object
# --------------------------------------------------------------------------------------------------


@dataclass
class _Map:
    mu: torch.Tensor  # [H]
    A: torch.Tensor  # [H, R]
    B: torch.Tensor  # [R, H]
    b: torch.Tensor  # [H]
    C: torch.Tensor | None = None  # [E, H] per-dropped-expert lookup (router features), or None
    dm: torch.Tensor | None = None  # [E] mean router feature
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])

    def folded(self, dtype, device):
        """(A, B, c, C, c_mean) in dtype/device: delta = x A B + c + sum_j w_j C[e_j] with c = b - mu A B - dm C;
        without router features at hand, c_mean = c + dm C is used instead (the features' mean)."""
        key = (dtype, str(device))
        if key not in self._cache:
            A64, B64 = self.A.double(), self.B.double()
            c = self.b.double() - (self.mu.double() @ A64) @ B64
            c_mean = c.clone()
            C = None
            if self.C is not None:
                c = c - self.dm.double() @ self.C.double()
                C = self.C.to(device=device, dtype=dtype)
            self._cache[key] = (self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype),
                                c.to(device=device, dtype=dtype), C, c_mean.to(device=device, dtype=dtype))
        return self._cache[key]


def _add_cost(cost: dict, m, n: int, H: int, lookups: int) -> None:
    """Work of one map on n tokens: 2 R H multiply-adds each, H bias adds each, H per dropped expert looked up."""
    cost["macs"] += n * 2 * m.rank * H + lookups * H
    cost["bias_adds"] += n * H
    cost["compensated_tokens"] += n


class Compensation:
    """Per MoE layer, per kept count c: a low-rank affine map predicting the dropped experts' output.

    maps[l][c] -> _Map; `top_k[l]` is layer l's original K; `meta` holds the fit facts (mode, ridge,
    ranks, FLOPs cap, plan, measured cost) and is saved in the file.
    """

    def __init__(self, maps: list[dict[int, _Map]], *, hidden_size: int, top_k: list[int],
                 expert_macs: list[int] | None = None, meta: dict | None = None):
        self.maps = maps
        self.hidden_size = int(hidden_size)
        self.top_k = [int(k) for k in top_k]
        self.expert_macs = [int(m) for m in (expert_macs or [0] * len(maps))]
        self.meta = dict(meta or {})
        self.sha256: str | None = None  # of the file it was saved to / loaded from

    # --- shape facts ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.maps)

    def ranks(self) -> list[dict[int, int]]:
        return [{c: m.rank for c, m in sorted(layer.items())} for layer in self.maps]

    def __repr__(self) -> str:
        return (f"Compensation(layers={self.num_layers}, hidden={self.hidden_size}, ranks={self.ranks()}, "
                f"mode={self.meta.get('mode')!r})")

    def summary(self) -> dict:
        """What a plan records about its compensation (beside the file name and sha256 `Plan.save` adds)."""
        m = self.meta
        sel = m.get("selection") or {}
        return {
            "mode": m.get("mode"), "ridge": m.get("ridge"), "router_features": self.router_features,
            "ranks": [max(layer.values()) if layer else 0 for layer in self.ranks()],
            "flops_fraction_cap": m.get("flops_fraction"),
            "comp_macs_per_token_calibration": m.get("comp_macs_per_token"),
            "saved_expert_macs_per_token_calibration": m.get("saved_expert_macs_per_token"),
            "comp_over_saved_calibration": m.get("comp_over_saved"),
            **({"selection_kl": sel.get("kl")} if sel else {}),
        }

    # --- inference ------------------------------------------------------------------------------
    def compensated(self, l: int, counts: torch.Tensor) -> torch.Tensor:
        """bool [T]: tokens of layer l that get a delta (count has a map; 1 <= count < K)."""
        mask = torch.zeros(counts.shape, dtype=torch.bool, device=counts.device)
        for c in self.maps[l]:
            mask |= counts == c
        return mask

    @property
    def router_features(self) -> bool:
        """True when some map also uses the dropped experts' router probabilities (see `dropped_experts`)."""
        return any(m.C is not None for layer in self.maps for m in layer.values())

    def delta(self, l: int, x: torch.Tensor, counts: torch.Tensor,
              dropped: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """[T, H] correction for inputs x [T, H] with per-token kept counts [T] (zero where no map).

        `dropped` = (index [T, J] with -1 for none, prob [T, J]) from `dropped_experts`, used by maps fitted
        with router features (without it those maps use the features' calibration mean)."""
        return self.delta_and_cost(l, x, counts, dropped)[0]

    def delta_and_cost(self, l: int, x: torch.Tensor, counts: torch.Tensor,
                       dropped: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
        """(`delta`, the work it executed as `macs` counts it), in one pass over the kept counts present in
        this call (one host read of their histogram: the inference hook's fast path)."""
        out = torch.zeros_like(x)
        cost = {"macs": 0, "bias_adds": 0, "compensated_tokens": 0}
        layer_maps = self.maps[l]
        if not layer_maps:
            return out, cost
        counts = counts.reshape(-1)
        H, T = self.hidden_size, counts.numel()
        for c, n in enumerate(torch.bincount(counts).tolist()):
            m = layer_maps.get(c)
            if m is None or n == 0:
                continue
            A, B, cb, C, cb_mean = m.folded(x.dtype, x.device)
            idx = None if n == T else (counts == c).nonzero().squeeze(1)
            xs = x if idx is None else x[idx]
            if C is None or dropped is None:
                d = (xs @ A) @ B + (cb if C is None else cb_mean)
            else:
                di, dw = dropped
                di, dw = (di, dw) if idx is None else (di[idx], dw[idx])
                live = di >= 0
                # sum_j w_j C[e_j] without materialising [t, J, H]: a weighted embedding bag
                look = F.embedding_bag(di.clamp(min=0), C, per_sample_weights=(dw * live).to(C.dtype), mode="sum")
                d = (xs @ A) @ B + cb + look
            _add_cost(cost, m, n, H, int(live.sum()) if C is not None and dropped is not None else 0)
            if idx is None:
                out = d
            else:
                out.index_copy_(0, idx, d)
        return out, cost

    def macs(self, l: int, counts: torch.Tensor, dropped: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """Work `delta(l, ., counts, dropped)` executes: 2 R H multiply-adds per compensated token, plus H per
        dropped expert looked up (maps with router features), plus H bias adds."""
        counts = counts.reshape(-1)
        cost = {"macs": 0, "bias_adds": 0, "compensated_tokens": 0}
        for c, m in self.maps[l].items():
            sel = counts == c
            n = int(sel.sum())
            lookups = int((dropped[0][sel] >= 0).sum()) if m.C is not None and dropped is not None and n else 0
            _add_cost(cost, m, n, self.hidden_size, lookups)
        return cost

    def flops_per_token(self, l: int, counts: torch.Tensor) -> float:
        """Compensation multiply-adds per real token (count >= 1) of layer l for these counts."""
        real = int((counts.reshape(-1) >= 1).sum())
        return self.macs(l, counts)["macs"] / real if real else 0.0

    # --- (de)serialisation ----------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        t = {}
        for l, layer_maps in enumerate(self.maps):
            for c, m in sorted(layer_maps.items()):
                for name in ("mu", "A", "B", "b", "C", "dm"):
                    v = getattr(m, name)
                    if v is not None:
                        t[f"l{l}.c{c}.{name}"] = v.detach().to(torch.float32).contiguous().cpu()
        return t

    def _header(self) -> dict:
        return {
            "num_layers": self.num_layers, "hidden_size": self.hidden_size, "top_k": self.top_k,
            "expert_macs_per_pair": self.expert_macs, "counts": [sorted(m) for m in self.maps],
            "meta": self.meta,
        }

    @staticmethod
    def _content_hash(tensors: dict[str, torch.Tensor], header: str) -> str:
        h = hashlib.sha256(header.encode())
        for name in sorted(tensors):
            h.update(name.encode())
            h.update(str(tuple(tensors[name].shape)).encode())
            h.update(tensors[name].numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> str:
        """Write a safetensors file (atomically); returns the sha256 of the file (put it in the plan)."""
        from safetensors.torch import save

        tensors = self._tensors()
        header = json.dumps(self._header(), sort_keys=True)
        metadata = {"format": FORMAT, "version": str(VERSION), "header": header,
                    "content_sha256": self._content_hash(tensors, header)}
        data = save(tensors, metadata=metadata)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self.sha256 = hashlib.sha256(data).hexdigest()
        return self.sha256

    @classmethod
    def load(cls, path: str | os.PathLike, expected_sha256: str | None = None, model: nn.Module | None = None
             ) -> "Compensation":
        """Read a file written by `save`; one-line errors for missing / corrupt / mismatched files."""
        from safetensors.torch import load

        path = Path(path)
        if not path.is_file():
            raise FileFormatError(f"compensation file {path} does not exist")
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None:
            exp = str(expected_sha256).removeprefix("sha256:").lower()
            if digest != exp:
                raise PlanError(f"compensation file {path} has sha256 {digest[:16]}..., but the plan expects "
                                f"{exp[:16]}...: the file was changed or belongs to another plan")
        try:
            n = int.from_bytes(data[:8], "little")
            if n <= 0 or n > len(data) - 8:
                raise ValueError("bad header length")
            meta = json.loads(data[8:8 + n].decode("utf-8")).get("__metadata__") or {}
            tensors = load(data)
        except Exception as e:  # truncated, not safetensors, bad JSON
            raise FileFormatError(f"compensation file {path} is not a readable safetensors file "
                                  f"({type(e).__name__})") from None
        if meta.get("format") != FORMAT:
            raise FileFormatError(f"{path} is not an allocmoe compensation file (format {meta.get('format')!r})")
        if meta.get("version") != str(VERSION):
            raise FileFormatError(f"compensation file {path} has unknown version {meta.get('version')!r} "
                                  f"(this allocmoe reads version {VERSION})")
        header_s = meta.get("header", "")
        if cls._content_hash(tensors, header_s) != meta.get("content_sha256"):
            raise FileFormatError(f"compensation file {path} is corrupt (content checksum mismatch)")
        try:
            header = json.loads(header_s)
            maps: list[dict[int, _Map]] = []
            for l, counts in enumerate(header["counts"]):
                maps.append({int(c): _Map(*(tensors[f"l{l}.c{c}.{k}"] for k in ("mu", "A", "B", "b")),
                                          C=tensors.get(f"l{l}.c{c}.C"), dm=tensors.get(f"l{l}.c{c}.dm"))
                             for c in counts})
            comp = cls(maps, hidden_size=header["hidden_size"], top_k=header["top_k"],
                       expert_macs=header.get("expert_macs_per_pair"), meta=header.get("meta") or {})
        except (KeyError, TypeError, ValueError) as e:
            raise FileFormatError(f"compensation file {path} is malformed ({type(e).__name__}: {e})") from None
        for l, layer_maps in enumerate(comp.maps):
            for c, m in layer_maps.items():
                H, R = comp.hidden_size, m.rank
                bad_c = (m.C is None) != (m.dm is None) or (
                    m.C is not None and (m.C.dim() != 2 or m.C.shape[1] != H or m.dm.shape != (m.C.shape[0],)))
                if (m.mu.shape != (H,) or m.A.shape != (H, R) or m.B.shape != (R, H) or m.b.shape != (H,)
                        or bad_c or not 1 <= c < comp.top_k[l]):
                    raise FileFormatError(f"compensation file {path}: layer {l} count {c} has inconsistent shapes")
        comp.sha256 = digest
        if model is not None:
            comp.check_model(model, source=f"compensation file {path}")
        return comp

    def check_model(self, model: nn.Module, source: str = "compensation") -> None:
        """Refuse a compensation made for another model (layer count, hidden size, top-K)."""
        layers = find_moe_layers(model)
        if len(layers) != self.num_layers:
            raise ModelMismatchError(f"{source} has {self.num_layers} MoE layers but the model has {len(layers)}: "
                                     "it was made for another model")
        H = _model_hidden_size(model, layers)
        if H != self.hidden_size:
            raise ModelMismatchError(f"{source} has hidden size {self.hidden_size} but the model has {H}: "
                                     "it was made for another model")
        ks = [l.top_k for l in layers]
        if ks != self.top_k:
            raise ModelMismatchError(f"{source} was made for top-k {self.top_k} but the model has {ks}")


# --------------------------------------------------------------------------------------------------
# installing: forward hooks on the experts modules
# --------------------------------------------------------------------------------------------------


def _router_hook(store: dict, l: int):
    """Keep the router logits [T, E] of the current call for the experts hook of the same layer."""
    def hook(module, args, output):
        logits = output[0] if isinstance(output, (tuple, list)) else output
        store[l] = logits.reshape(-1, logits.shape[-1]).detach()
    return hook


def dropped_experts(logits: torch.Tensor, index: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts a token would have used at full K but does not: (index [T, K] with -1 where kept or
    none, softmax probability [T, K]). Family-agnostic: ranks by the router logits the (patched) router
    returns anyway (exact for softmax routers; an approximation used only as a feature elsewhere), so it
    costs a top-K over E and no matmul."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    probs = torch.softmax(logits, dim=-1)
    top = torch.topk(logits, k=min(K, logits.shape[-1]), dim=-1).indices  # [T, K]
    kept = (top.unsqueeze(-1) == index.reshape(top.shape[0], -1).unsqueeze(1)).any(-1)
    real = (index.reshape(top.shape[0], -1) >= 0).any(-1, keepdim=True)  # padding: nothing dropped
    drop = ~kept & real
    return top.masked_fill(~drop, -1), probs.gather(1, top) * drop


class CompensationHandle:
    """Returned by `install`: `.remove()` (or context manager), `.flops()` counts, `.reset_counts()`."""

    def __init__(self, model: nn.Module, comp: Compensation, layers):
        self.model, self.comp, self.layers = model, comp, layers
        self._hooks: list = []
        self._logits: dict[int, torch.Tensor] = {}  # router logits of the current call, per layer
        n = len(layers)
        self.macs_total = [0] * n
        self.adds_total = [0] * n
        self.comp_tokens_total = [0] * n
        self.tokens_total = [0] * n
        self.macs_last = [0] * n
        self.tokens_last = [0] * n

    def _make_hook(self, l: int):
        comp = self.comp
        K = self.layers[l].top_k

        def hook(module, args, kwargs, output):
            h, index, _ = _experts_args(args, kwargs)
            logits = self._logits.pop(l, None)
            if index is None or not comp.maps[l]:
                return None
            counts = (index >= 0).sum(-1).reshape(-1)
            real = int((counts >= 1).sum())
            self.tokens_total[l] += real
            self.tokens_last[l] = real
            dropped = None
            if comp.router_features and logits is not None and logits.shape[0] == counts.shape[0]:
                dropped = dropped_experts(logits, index, K)
            d, cost = comp.delta_and_cost(l, h.reshape(-1, h.shape[-1]), counts, dropped)
            self.macs_last[l] = cost["macs"]
            if cost["compensated_tokens"] == 0:
                return None
            self.macs_total[l] += cost["macs"]
            self.adds_total[l] += cost["bias_adds"]
            self.comp_tokens_total[l] += cost["compensated_tokens"]
            return output + d.view(output.shape).to(output.dtype)

        return hook

    def install(self) -> "CompensationHandle":
        for l, layer in enumerate(self.layers):
            if self.comp.router_features and self.comp.maps[l]:
                self._hooks.append(layer.router.register_forward_hook(_router_hook(self._logits, l)))
            self._hooks.append(layer.experts.register_forward_hook(self._make_hook(l), with_kwargs=True))
        return self

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._logits.clear()

    def __enter__(self) -> "CompensationHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def reset_counts(self) -> None:
        n = len(self.layers)
        self.macs_total, self.adds_total = [0] * n, [0] * n
        self.comp_tokens_total, self.tokens_total = [0] * n, [0] * n
        self.macs_last, self.tokens_last = [0] * n, [0] * n

    def flops(self) -> dict:
        """Measured compensation work since install / reset (multiply-adds; 1 MAC = 2 FLOPs).

        `macs_per_token` divides by the real tokens seen (a token = one position of a forward call,
        counted once per model, i.e. the max over layers); per layer, by that layer's real tokens.
        `expert_macs_per_pair` lets a report put this beside the expert activations.
        """
        n = max(self.tokens_total) if self.tokens_total else 0
        total = sum(self.macs_total)
        return {
            "macs_total": total,
            "bias_adds_total": sum(self.adds_total),
            "tokens": n,
            "macs_per_token": total / n if n else 0.0,
            "macs_per_token_per_layer": [m / t if t else 0.0 for m, t in zip(self.macs_total, self.tokens_total)],
            "compensated_tokens_per_layer": list(self.comp_tokens_total),
            "expert_macs_per_pair": list(self.comp.expert_macs),
            "flops_per_token": 2 * total / n if n else 0.0,
        }


def install(model: nn.Module, comp: Compensation) -> CompensationHandle:
    """Add `comp`'s delta to each MoE layer's routed output (install after `apply(model, plan)`)."""
    comp.check_model(model)
    return CompensationHandle(model, comp, find_moe_layers(model)).install()


# --------------------------------------------------------------------------------------------------
# fitting
# --------------------------------------------------------------------------------------------------


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


def _reduce_rank(W: torch.Tensor, cxx: torch.Tensor, rank: int, metric: torch.Tensor | None):
    """Best rank-R version of W [H, H] for inputs with covariance cxx, in the output metric G (None: identity):
    with G = S S^T, A = W S V, B = V^T S^-1, V the top-R eigenvectors of S W^T Cxx W S."""
    if metric is None:
        S_inv = None
        Ws = W
    else:
        g = metric.to(torch.float64)
        g = (g + g.T) / 2
        ev, U = torch.linalg.eigh(g)
        ev = ev.clamp(min=0) + 1e-3 * float(ev.clamp(min=0).mean()) + 1e-30  # keep every direction a little
        S, S_inv = (U * ev.sqrt()) @ U.T, (U * ev.rsqrt()) @ U.T
        Ws = W @ S
    fitted = Ws.T @ cxx @ Ws  # covariance of the fitted values (n x) -> eigenvectors = right singular dirs
    fitted = (fitted + fitted.T) / 2
    evals, evecs = torch.linalg.eigh(fitted)
    V = evecs[:, torch.argsort(evals, descending=True)[:rank]]  # [H, R]
    return Ws @ V, (V.T if S_inv is None else V.T @ S_inv)


def _solve(acc: _Acc, rank: int, ridge: float, metric: torch.Tensor | None = None) -> _Map:
    """Ridge least squares on the centred accumulators, then the rank-R truncation of the x part (in the
    output metric, see `_reduce_rank`); with router features the per-expert lookup is refitted on what
    the rank-R x part leaves."""
    n, H, E = acc.n, acc.H, acc.E
    mz, mr = acc.sx / n, acc.sr / n
    czz = acc.xx - n * torch.outer(mz, mz)
    czr = acc.xr - n * torch.outer(mz, mr)
    lam_x = ridge * float(torch.trace(czz[:H, :H])) / H + 1e-12
    if E == 0:
        W = torch.linalg.solve(czz + lam_x * torch.eye(H, dtype=torch.float64), czr)  # [H, H]
        A, B = _reduce_rank(W, czz, rank, metric)
        return _Map(mu=mz.float(), A=A.float().contiguous(), B=B.float().contiguous(), b=mr.float())
    cdd = czz[H:, H:]
    # the per-expert lookup sees few tokens for rarely dropped experts: at least a relative ridge of 0.1
    # there (weaker ridges gave huge, cancelling coefficients on tiny DeepSeek-V3 models)
    lam_d = max(ridge, FEATURE_RIDGE) * float(torch.trace(cdd)) / E + 1e-12
    lam = torch.cat([torch.full((H,), lam_x, dtype=torch.float64), torch.full((E,), lam_d, dtype=torch.float64)])
    W = torch.linalg.solve(czz + torch.diag(lam), czr)  # [H + E, H]
    A, B = _reduce_rank(W[:H], czz[:H, :H], rank, metric)
    WR = A @ B
    C = torch.linalg.solve(cdd + lam_d * torch.eye(E, dtype=torch.float64), czr[H:] - czz[H:, :H] @ WR)
    return _Map(mu=mz[:H].float(), A=A.float().contiguous(), B=B.float().contiguous(), b=mr.float(),
                C=C.float().contiguous(), dm=mz[H:].float())


def _layer_maps(st: _LayerStats, *, rank, max_rank: int, ridge: float, flops_fraction: float | None,
                min_tokens: int, macs_pair: int, l: int, layer_name: str, metric: torch.Tensor | None = None
                ) -> tuple[dict[int, _Map], dict]:
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
            maps[c] = _solve(st.acc[c], min(R, max(1, st.acc[c].n - 1)), ridge, metric)
    info = {"rank": R if maps else 0, "rank_cap": cap, "counts": {str(c): st.acc[c].n for c in sorted(st.acc)},
            "real_tokens": real, "mean_kept": st.mean_count, "compensated_fraction": p_comp if maps else 0.0,
            "saved_expert_macs_per_token": saved,
            "lookups_per_compensated_token": lookups,
            "comp_macs_per_token": ((2 * R + lookups) * H * p_comp) if maps else 0.0}
    return maps, info


def _first(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def _run_until(model, decoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The (unpatched) model's output of `decoder` for ids, stopping the forward right there."""
    box = {}

    def hook(module, args, output):
        box["h"] = _first(output).detach().clone()
        raise _Stop()

    hk = decoder.register_forward_hook(hook)
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        hk.remove()
    return box["h"]


def _trajectory_hooks(layer, decoder: nn.Module, target: torch.Tensor, st: "_LayerStats", features=None):
    """Hooks for one budgeted pass: x and counts at the experts; at the decoder layer's output the gap to
    the full model's state (what the map should add) is accumulated and the pass stops."""
    box = {}

    def experts_hook(module, args, kwargs, output):
        h, index, _ = _experts_args(args, kwargs)
        box["x"] = h.reshape(-1, h.shape[-1])
        box["counts"] = (index >= 0).sum(-1).reshape(-1)
        box["d"] = None if features is None else features(index, box["x"].shape[0])

    def decoder_hook(module, args, output):
        out = _first(output)
        g = (target - out).reshape(-1, out.shape[-1])
        x, counts, d = box["x"], box["counts"], box["d"]
        real = counts >= 1
        if not bool(real.all()):
            x, g, counts = x[real], g[real], counts[real]
            d = None if d is None else d[real]
        st.add(x, g, counts, d)
        raise _Stop()

    return [layer.experts.register_forward_hook(experts_hook, with_kwargs=True),
            decoder.register_forward_hook(decoder_hook)]


def _output_fisher(model, layers, windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Per MoE layer, sum over calibration tokens of g g^T (float64 [H, H]), g = d(summed next-token NLL) /
    d(routed experts output) in the full (unpatched) model."""
    dev = _device(model)
    outs: list = [None] * len(layers)

    def hook_for(l):
        def hook(module, args, output):
            outs[l] = output
        return hook

    acc: list = [None] * len(layers)
    hooks = [layer.experts.register_forward_hook(hook_for(l)) for l, layer in enumerate(layers)]
    try:
        with torch.enable_grad():
            for ids in _batches(windows, batch_size):
                ids = ids.to(dev)
                logits = model(input_ids=ids, use_cache=False).logits.float()
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="sum")
                grads = torch.autograd.grad(loss, outs)
                for l, g in enumerate(grads):
                    g = g.detach().reshape(-1, g.shape[-1]).to(torch.float64).cpu()
                    acc[l] = g.T @ g if acc[l] is None else acc[l] + g.T @ g
    finally:
        for h in hooks:
            h.remove()
    return acc


def _batches(windows: torch.Tensor, batch_size: int):
    for i in range(0, windows.shape[0], batch_size):
        yield windows[i:i + batch_size]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def fit_compensation(model: nn.Module, plan, windows: torch.Tensor, *, rank: int | str = "auto",
                     ridge: float = DEFAULT_RIDGE, mode: str = "sequential", batch_size: int = 8,
                     max_rank: int = DEFAULT_MAX_RANK, flops_fraction: float | None = DEFAULT_FLOPS_FRACTION,
                     min_tokens: int = DEFAULT_MIN_TOKENS, metric: str = "euclidean",
                     router_features: bool = True, progress: bool = True) -> Compensation:
    """Fit per-(layer, kept count) low-rank maps for `plan` on calibration `windows` [N, S] (token ids).

    mode "teacher": inputs are the full model's states (one pass). "sequential": each layer on the
    budgeted model's own states with the earlier layers' compensation installed (a pass per layer,
    each stopping after its layer). `rank`: "auto" (largest within the FLOPs cap, <= max_rank) or an
    integer used in every compensated layer (refused with PlanError where it breaks the cap).
    `ridge` is relative to the mean input variance. `metric`: the output metric the rank-R truncation
    is best in: "euclidean" (||r - delta||^2) or "fisher" (E[g g^T] of the full model's NLL gradient g
    w.r.t. the experts output, one extra forward+backward pass). `router_features`: also add, per
    dropped expert e (`dropped_experts`: ranked by the router logits the router returns anyway), its
    router probability times a fitted vector C[e] (H multiply-adds per dropped expert, counted in the
    cap, so the rank is lower). Counts seen on fewer than `min_tokens` calibration
    tokens get no map. The model must not have a plan applied (this applies `plan` itself).
    """
    if metric not in ("euclidean", "fisher"):
        raise PlanError(f"unknown compensation metric {metric!r} (choose euclidean or fisher)")
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
    H = _model_hidden_size(model, layers)
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
    maps: list[dict[int, _Map]] = [{} for _ in layers]
    infos: list[dict] = [{} for _ in layers]
    comp = Compensation(maps, hidden_size=H, top_k=[l.top_k for l in layers], expert_macs=macs_pair)
    kw = dict(rank=rank, max_rank=max_rank, ridge=ridge, flops_fraction=flops_fraction, min_tokens=min_tokens)
    dev = _device(model)
    was_training = model.training
    model.eval()
    metrics = _output_fisher(model, layers, windows, batch_size) if metric == "fisher" else [None] * L

    def collect_hook(l: int, replace: bool, stop: bool):
        layer = layers[l]

        def hook(module, args, kwargs, output):
            h, index, _ = _experts_args(args, kwargs)
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

    router_hooks = [layer.router.register_forward_hook(_router_hook(logits_store, l))
                    for l, layer in enumerate(layers)] if router_features else []
    try:
        with torch.no_grad():
            if mode == "teacher":
                handle = apply(model, plan)
                hooks = [layers[l].experts.register_forward_hook(collect_hook(l, True, False), with_kwargs=True)
                         for l in range(L)]
                try:
                    for ids in _progress(list(_batches(windows, batch_size)), "compensation (teacher)", progress):
                        model(input_ids=ids.to(dev), use_cache=False)
                finally:
                    for hk in hooks:
                        hk.remove()
                    handle.remove()
                for l in range(L):
                    maps[l], infos[l] = _layer_maps(stats[l], macs_pair=macs_pair[l], l=l, layer_name=layers[l].name,
                                                    metric=metrics[l], **kw)
            else:
                batches = list(_batches(windows, batch_size))
                steps = _progress(range(L * len(batches)), f"compensation ({mode})", progress)
                it = iter(steps)
                for l in range(L):
                    decoder = model.get_submodule(layers[l].name.rsplit(".", 1)[0]) if mode == "trajectory" else None
                    for ids in batches:
                        ids = ids.to(dev)
                        target = None
                        if decoder is not None:  # the full model's residual stream after layer l
                            target = _run_until(model, decoder, ids)
                        handle = apply(model, plan)
                        comp_handle = CompensationHandle(model, comp, layers).install()  # maps[l:] still empty
                        if decoder is None:
                            hks = [layers[l].experts.register_forward_hook(collect_hook(l, False, True),
                                                                           with_kwargs=True)]
                        else:
                            hks = _trajectory_hooks(layers[l], decoder, target, stats[l],
                                                    lambda index, T, l=l: features(l, index, T))
                        try:
                            model(input_ids=ids, use_cache=False)
                        except _Stop:
                            pass
                        finally:
                            for hk in hks:
                                hk.remove()
                            comp_handle.remove()
                            handle.remove()
                        next(it, None)
                    maps[l], infos[l] = _layer_maps(stats[l], macs_pair=macs_pair[l], l=l, layer_name=layers[l].name,
                                                    metric=metrics[l], **kw)
                if hasattr(steps, "close"):
                    steps.close()
    finally:
        for hk in router_hooks:
            hk.remove()
        model.train(was_training)

    comp_macs = sum(i["comp_macs_per_token"] for i in infos)
    saved = sum(i["saved_expert_macs_per_token"] for i in infos)
    comp.meta = {
        "mode": mode, "metric": metric, "router_features": router_features, "ridge": ridge, "rank": rank, "max_rank": max_rank, "flops_fraction": flops_fraction,
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


# --------------------------------------------------------------------------------------------------
# scoring: KL to the full model, calibration residual
# --------------------------------------------------------------------------------------------------


def _full_reference(model, windows, batch_size) -> list[Reference]:
    dev = _device(model)
    with torch.no_grad():
        return [Reference.of(model(input_ids=ids.to(dev), use_cache=False).logits.cpu())
                for ids in _batches(windows, batch_size)]


def kl_to_full(model: nn.Module, plan, comp: Compensation | None, windows: torch.Tensor, *, batch_size: int = 8,
               reference: list[Reference] | None = None) -> float:
    """Mean per-token KL(full || plan [+ comp]) in nats on `windows` (use held-out calibration windows);
    `reference`: the full model's side, when several candidates are scored on the same windows."""
    if reference is None:
        reference = _full_reference(model, windows, batch_size)
    dev = _device(model)
    total, n = 0.0, 0
    with torch.no_grad(), apply(model, plan):
        ctx = install(model, comp) if comp is not None else contextlib.nullcontext()
        with ctx:
            for ids, ref in zip(_batches(windows, batch_size), reference):
                total += ref.kl_sum(model(input_ids=ids.to(dev), use_cache=False).logits.cpu())
                n += ref.plogp.numel()
    return total / n


def calibration_residual(model: nn.Module, plan, comp: Compensation, windows: torch.Tensor, *,
                         mode: str = "teacher", batch_size: int = 8) -> list[dict]:
    """Per MoE layer: ||r||^2 and ||r - delta||^2 summed over compensated tokens, r = y_full - y_kept.

    mode "teacher": states of the full model; "sequential": the budgeted model with `comp` installed.
    """
    layers = find_moe_layers(model)
    res = [{"r2": 0.0, "err2": 0.0, "tokens": 0} for _ in layers]
    dev = _device(model)

    def hook_for(l):
        def hook(module, args, kwargs, output):
            h, index, _ = _experts_args(args, kwargs)
            x = h.reshape(-1, h.shape[-1])
            y_full = _full_output(layers[l], x)
            counts = (index >= 0).sum(-1).reshape(-1)
            sel = comp.compensated(l, counts)
            # the output may already include the delta (sequential: comp hooks run first); recompute y_kept
            lg = store.pop(l, None)
            dropped = dropped_experts(lg, index, layers[l].top_k) if comp.router_features and lg is not None else None
            d = comp.delta(l, x, counts, dropped)
            y_kept = output.reshape(-1, x.shape[-1]) - (d if mode != "teacher" else 0)
            r = (y_full - y_kept)[sel].double()
            res[l]["r2"] += float((r ** 2).sum())
            res[l]["err2"] += float(((r - d[sel].double()) ** 2).sum())
            res[l]["tokens"] += int(sel.sum())
            return y_full.view(output.shape) if mode == "teacher" else None

        return hook

    store: dict = {}
    with torch.no_grad(), apply(model, plan):
        ch = install(model, comp) if mode != "teacher" else None
        hooks = [layers[l].experts.register_forward_hook(hook_for(l), with_kwargs=True) for l in range(len(layers))]
        hooks += [layers[l].router.register_forward_hook(_router_hook(store, l)) for l in range(len(layers))]
        try:
            for ids in _batches(windows, batch_size):
                model(input_ids=ids.to(dev), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
            if ch is not None:
                ch.remove()
    return res


def fit_best(model: nn.Module, plan, windows: torch.Tensor, *, holdout: torch.Tensor | int | None = None,
             modes: tuple[str, ...] = ("teacher", "sequential"), batch_size: int = 8, progress: bool = True,
             refit: bool = False, ridges: tuple[float, ...] | None = None, **fit_kw: Any) -> Compensation:
    """Fit every mode in `modes` and keep the one with the lower KL to the full model on held-out windows.

    `holdout`: calibration windows kept out of fitting (a tensor), or how many of the last windows of
    `windows` to hold out (default: an eighth, at least one). Never pass evaluation text here. The
    scores (and the plan's KL without compensation) are recorded in `meta["selection"]`. The result is
    the winner as fitted on the non-held-out windows; `refit=True` refits the winning mode on all of
    `windows` (plus a holdout tensor, if given). `ridges`: also choose the ridge among these on the same
    held-out KL (default: just `ridge`, or the default). Other keywords go to `fit_compensation`.
    """
    if isinstance(holdout, torch.Tensor):
        fit_w, held = windows, holdout
    else:
        n_held = max(1, windows.shape[0] // 8) if holdout is None else int(holdout)
        if windows.shape[0] - n_held < 1:
            raise DataError(f"need more than {n_held} calibration windows to hold {n_held} out")
        fit_w, held = windows[:-n_held], windows[-n_held:]
    full = _full_reference(model, held, batch_size)
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
    comp.meta["selection"] = {"kl": scores, "chosen": comp.meta["mode"], "ridge": comp.meta["ridge"], "holdout_tokens": int(held.numel()), "refit": refit,
                              "improves_on_plan": scores[best] < scores["none"]}
    return comp
