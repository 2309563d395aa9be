"""Dropped-expert compensation at inference: the fitted maps, their file, and the hooks that add them.

Under a budget a token keeps only its best c < K routed experts in a MoE layer. What the dropped experts
would have added, r = y_full - y_kept (y = the routed experts' output, what the experts module returns;
shared experts are untouched), is partly predictable from the block input x. For every MoE layer l and
every kept count c in [1, K_l - 1] that occurs under the plan's token policy a `Compensation` holds a
low-rank affine map (`CountMap`, fitted by compensation_fit.py)

    delta_{l,c}(x) = (x - mu) A B + b  [+ sum_{e dropped} p_e (C[e] - ...)]      A [H, R], B [R, H]

added to the kept experts' output of every token with kept count c. Tokens with count 0 (padding) or
count >= K (nothing dropped) get nothing, so a full-K plan stays bitwise exact.

Router features: the bracketed term. The router has already scored every expert, so which experts a token
drops and their router probabilities p_e are known for free (a top-K over the logits the router returns;
`dropped_experts`). Each dropped expert adds p_e C[e], C [E, H] (a lookup: H multiply-adds per dropped
expert). Without the router logits at hand (`delta(l, x, counts)` with no `dropped`), the lookup is
replaced by its calibration mean.

Cost. A map costs 2 R H multiply-adds per compensated token (x A, then B), plus H per dropped expert looked
up, plus H bias adds; `CompensationHandle.flops()` counts exactly that for the work executed. A routed
expert pair costs `expert_macs_per_pair` multiply-adds (3 H I for gated experts), for comparison.

Files: `save(path)` writes safetensors (tensors `l{l}.c{c}.{mu,A,B,b[,C,dm]}`, metadata: format, version,
a JSON header with the model/plan facts, and a sha256 of the content) atomically and returns the file's
sha256; `Compensation.load(path, expected_sha256=None, model=None)` raises FileFormatError (missing,
unreadable, not a compensation file, content checksum wrong), PlanError (file sha256 differs from the
expected one) or ModelMismatchError (does not fit the model), each with a one-line message.

`install(model, comp)` (after `apply(model, plan)`, or on an unpatched model where it does nothing since
every token keeps K) adds the delta with forward hooks on each layer's experts module and counts the
multiply-adds it executes (`handle.flops()`). This module imports neither patching nor plan: both use it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import find_moe_layers
from .errors import FileFormatError, ModelMismatchError, PlanError
from .io import atomic_write_bytes

FORMAT = "allocmoe-compensation"
VERSION = 1

__all__ = [
    "Compensation", "CompensationHandle", "CountMap", "install", "expert_macs_per_pair", "dropped_experts",
    "model_hidden_size", "experts_call_args", "router_logits_hook",
]


def expert_macs_per_pair(layer) -> int:
    """Multiply-adds of one routed (token, expert) pair: the experts' 3-D weights per expert (3 H I gated)."""
    E = int(layer.num_experts)
    n = sum(p.numel() for p in layer.experts.parameters() if p.dim() == 3)
    if n == 0 or E == 0:  # experts as a ModuleList of MLPs (older layouts): their 2-D weights per expert
        n = sum(p.numel() for p in layer.experts.parameters() if p.dim() == 2)
    return int(round(n / max(E, 1)))


def model_hidden_size(model, layers) -> int:
    """The model's hidden size H (the config's, else the first router's input width)."""
    h = getattr(getattr(model, "config", None), "hidden_size", None)
    if h is not None:
        return int(h)
    return int(layers[0].router.weight.shape[-1])


def experts_call_args(args, kwargs):
    """(hidden_states, top_k_index, top_k_weights) of an experts call, positional or keyword."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args[:3])
    for name in names[len(vals):]:
        vals.append(kwargs.get(name))
    return vals[0], vals[1], vals[2]


# --------------------------------------------------------------------------------------------------
# the compensation object
# --------------------------------------------------------------------------------------------------


@dataclass
class CountMap:
    """The map of one (layer, kept count): delta(x) = (x - mu) A B + b [+ sum_j p_j (C[e_j] - dm C)]."""

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

    maps[l][c] -> CountMap; `top_k[l]` is layer l's original K; `meta` holds the fit facts (mode, ridge,
    ranks, FLOPs cap, plan, measured cost) and is saved in the file.
    """

    def __init__(self, maps: list[dict[int, CountMap]], *, hidden_size: int, top_k: list[int],
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
            # the layers whose maps lowered held-out KL beyond noise (compensation_select.py); absent: not pruned
            **({"kept_layers": m["kept_layers"]} if "kept_layers" in m else {}),
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

    def weights_digest(self) -> str:
        """sha256 of the maps alone (not `meta`): two compensations with the same digest compute the same."""
        return self._content_hash(self._tensors(), json.dumps(
            {"counts": [sorted(m) for m in self.maps], "top_k": self.top_k}, sort_keys=True))

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
        atomic_write_bytes(path, data)
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
            maps: list[dict[int, CountMap]] = []
            for l, counts in enumerate(header["counts"]):
                maps.append({int(c): CountMap(*(tensors[f"l{l}.c{c}.{k}"] for k in ("mu", "A", "B", "b")),
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
        H = model_hidden_size(model, layers)
        if H != self.hidden_size:
            raise ModelMismatchError(f"{source} has hidden size {self.hidden_size} but the model has {H}: "
                                     "it was made for another model")
        ks = [l.top_k for l in layers]
        if ks != self.top_k:
            raise ModelMismatchError(f"{source} was made for top-k {self.top_k} but the model has {ks}")


# --------------------------------------------------------------------------------------------------
# installing: forward hooks on the experts modules
# --------------------------------------------------------------------------------------------------


def router_logits_hook(store: dict, l: int):
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
            h, index, _ = experts_call_args(args, kwargs)
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
                self._hooks.append(layer.router.register_forward_hook(router_logits_hook(self._logits, l)))
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
