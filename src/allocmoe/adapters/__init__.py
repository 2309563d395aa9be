"""Find the routed MoE blocks of a Hugging Face model, by module structure, and pick their family.

A block is a module that holds an `experts` module and a router (`gate` or `router`) with a `top_k`
attribute. Config names are not used to find blocks (they differ per family: num_local_experts,
num_experts, n_routed_experts), only to refuse families we know cannot save compute.
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import NoMoELayersError, UnsupportedModelError
from .base import FamilyAdapter, MoELayer, RouterScores
from .families import ADAPTERS, REFUSED, register_family
from .sharding import global_num_experts

__all__ = ["find_moe_layers", "decoder_layers", "FamilyAdapter", "MoELayer", "RouterScores", "ADAPTERS", "register_family",
           "model_type"]


def model_type(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", "?"))


def _router_of(block: nn.Module) -> nn.Module | None:
    for attr in ("gate", "router"):
        r = getattr(block, attr, None)
        if isinstance(r, nn.Module) and hasattr(r, "top_k"):
            return r
    return None


def _shared(block: nn.Module, model: nn.Module) -> tuple[int, int | None]:
    for attr in ("shared_experts", "shared_expert"):
        m = getattr(block, attr, None)
        if isinstance(m, nn.Module):
            down = getattr(m, "down_proj", None)
            inter = getattr(down, "in_features", None)
            n = getattr(getattr(model, "config", None), "n_shared_experts", None) or 1
            return int(n), inter
    return 0, None


def _decoder_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The decoder layer list: the ModuleList that holds the MoE blocks (or model.model.layers)."""
    base = getattr(model, "model", None)
    cand = getattr(base, "layers", None) if isinstance(base, nn.Module) else None
    if isinstance(cand, nn.ModuleList) and len(cand):
        for name, mod in model.named_modules():
            if mod is cand:
                return name, cand
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and n and len(mod) == n:
            return name, mod
    return None


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers in order ([] if there is no recognisable decoder stack).

    The one place allocmoe finds them: `find_moe_layers` derives each block's `decoder_index` from it,
    profiling replays cached decoder outputs with it, the benchmark times the decoder stack with it.
    """
    found = _decoder_stack(model)
    return list(found[1]) if found else []


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """All routed MoE blocks in module order. Raises NoMoELayersError / UnsupportedModelError."""
    mtype = model_type(model)
    if mtype in REFUSED:
        raise UnsupportedModelError(f"{mtype} is not supported: {REFUSED[mtype]}")
    layers: list[MoELayer] = []
    stack = _decoder_stack(model)
    prefix = (stack[0] + ".") if stack else None
    for name, mod in model.named_modules():
        experts = getattr(mod, "experts", None)
        router = _router_of(mod)
        if not isinstance(experts, nn.Module) or router is None:
            continue
        adapter = next((a for a in ADAPTERS.values() if a.matches(router)), None)
        if adapter is None:
            supported = ", ".join(ADAPTERS)
            raise UnsupportedModelError(
                f"MoE block {name} uses router {type(router).__name__}, which allocmoe does not support "
                f"(supported families: {supported})"
            )
        # the global count: under expert parallel the experts module holds only this rank's experts
        num_experts = global_num_experts(experts, router)
        m = re.match(rf"{re.escape(prefix)}(\d+)\.", name + ".") if prefix else None
        n_shared, shared_inter = _shared(mod, model)
        layers.append(
            MoELayer(
                index=len(layers),
                name=name,
                decoder_index=int(m.group(1)) if m else None,
                block=mod,
                router=router,
                experts=experts,
                adapter=adapter,
                num_experts=num_experts,
                top_k=int(router.top_k),
                shared_experts=n_shared,
                shared_intermediate_size=shared_inter,
            )
        )
    if not layers:
        raise NoMoELayersError(
            f"model ({mtype}) has no MoE layers: no module holds `experts` and a router with `top_k`"
        )
    return layers
