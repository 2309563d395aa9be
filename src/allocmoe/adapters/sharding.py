"""What this rank holds of a (possibly sharded) experts module: the inspection that finding MoE blocks needs.

Under transformers' expert parallel each rank's experts module keeps only its local experts, so the block's
`num_experts` is the local count; under tensor parallel the expert weights are DTensors. Finding the MoE
blocks (adapters/__init__.py) needs the *global* expert count, and the sharded kernels (distributed.py) need
the sharding kind; both read it from here, so the adapters never import distributed.py (which imports them).
"""

from __future__ import annotations

import torch


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def to_local(t):
    """A DTensor's local shard; any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def expert_weights(experts):
    """The experts module's first stacked weight parameter ([E, ...]), or None."""
    for name in ("gate_up_proj", "up_proj", "w1", "down_proj"):
        w = experts._parameters.get(name) if hasattr(experts, "_parameters") else None
        if w is not None:
            return w
    return None


def experts_sharding(experts) -> str | None:
    """"ep" (expert parallel), "tp" (tensor parallel) or None (every expert whole on this rank)."""
    if getattr(experts, "_is_expert_parallel", False):
        return "ep"
    w = expert_weights(experts)
    if w is not None and is_dtensor(w):
        return "tp"
    return None


def global_num_experts(experts, router) -> int:
    """The model's number of routed experts, whatever this rank holds (EP keeps only the local ones)."""
    local = int(getattr(experts, "num_experts", getattr(router, "num_experts", 0)) or 0)
    if not getattr(experts, "_is_expert_parallel", False):
        return local
    w = expert_weights(experts)
    if w is not None and w.dim() >= 3:
        return int(w.shape[0])  # a DTensor's shape is the global shape
    rw = getattr(router, "weight", None)
    if rw is not None and rw.dim() == 2:
        return int(rw.shape[0])
    world = torch.distributed.get_world_size() if torch.distributed.is_available() and \
        torch.distributed.is_initialized() else 1
    return local * world
