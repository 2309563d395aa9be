"""Compensation only where it helps: per MoE layer, "no map" is one of the choices, kept unless the layer's
maps lower the KL to the full model on held-out calibration windows beyond noise.

After `fit_best` has chosen the fitting mode, `prune_layers` scores each layer once: with every map
installed, the per-position KL on the held-out windows is compared with and without layer l's maps. The
differences are averaged in blocks of `BLOCK` consecutive positions (neighbouring positions are correlated); layer l keeps its maps only
if the mean block difference exceeds `NOISE_Z` standard errors of it (and is positive), i.e. the maps help
beyond what the held-out text can resolve. On a model where the maps cannot help (random weights) every
layer ends with no map. The result's `meta["kept_layers"]` lists the layers that kept one and
`meta["layer_selection"]` each layer's figures.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .compensation_maps import Compensation, install
from .divergence import Reference, batches, forward_logits
from .patching import apply

NOISE_Z = 2.0
BLOCK = 32


def position_kl(model: nn.Module, plan, comp: Compensation | None, windows: torch.Tensor,
                reference: list[Reference], batch_size: int) -> torch.Tensor:
    """KL(full || plan [+ comp]) at every position of `windows`, flattened in window order (float64)."""
    out = []
    with apply(model, plan), (install(model, comp) if comp is not None else contextlib.nullcontext()):
        with torch.no_grad():
            for ids, ref in zip(batches(windows, batch_size), reference):
                ref = ref.head(ids.shape[0])
                kl, _ = ref.kl(forward_logits(model, ids).to(ref.p.device))
                out.append(kl.double().reshape(-1).cpu())
    return torch.cat(out)


def without_layers(comp: Compensation, drop: set[int]) -> Compensation:
    """A copy of `comp` with the maps of layers `drop` removed (those layers run uncompensated)."""
    maps = [{} if l in drop else dict(m) for l, m in enumerate(comp.maps)]
    return Compensation(maps, hidden_size=comp.hidden_size, top_k=comp.top_k, expert_macs=comp.expert_macs,
                        meta=dict(comp.meta))


def benefit(with_map: torch.Tensor, without: torch.Tensor) -> tuple[float, float]:
    """(mean KL lowered by the maps per position, its standard error over blocks of BLOCK positions)."""
    d = (without - with_map).numpy()
    n_blocks = max(1, len(d) // BLOCK)
    blocks = [float(d[i * BLOCK:(i + 1) * BLOCK].mean()) if i < n_blocks - 1 else float(d[i * BLOCK:].mean())
              for i in range(n_blocks)]
    mean = float(d.mean())
    if n_blocks < 2:
        return mean, math.inf
    m = sum(blocks) / n_blocks
    var = sum((b - m) ** 2 for b in blocks) / (n_blocks - 1)
    return mean, math.sqrt(var / n_blocks)


def prune_layers(model: nn.Module, plan, comp: Compensation, held: torch.Tensor, reference: list[Reference],
                 batch_size: int = 8, z: float = NOISE_Z) -> Compensation:
    """`comp` keeping only the layers whose maps help beyond noise on `held` (see the module docstring):
    one held-out pass with every map, one per layer without that layer's maps (L + 1 passes)."""
    base = position_kl(model, plan, comp, held, reference, batch_size)
    figures: dict[int, dict] = {}
    for l, m in enumerate(comp.maps):
        if m:
            gain, se = benefit(base, position_kl(model, plan, without_layers(comp, {l}), held, reference,
                                                 batch_size))
            figures[l] = {"kl_lowered": gain, "se": se, "kept": gain > 0 and gain > z * se}
    out = without_layers(comp, {l for l, f in figures.items() if not f["kept"]})
    out.meta["kept_layers"] = [l for l, m in enumerate(out.maps) if m]
    out.meta["layer_selection"] = {"noise_z": z, "block": BLOCK, "held_out_positions": int(base.numel()),
                                   "layers": {str(l): f for l, f in sorted(figures.items())}}
    return out
