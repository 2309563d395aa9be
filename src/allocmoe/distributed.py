"""Plans on sharded models (transformers' tensor / expert parallelism under torchrun), data-parallel helpers.

transformers 5.x shards a MoE model across the ranks of a `torchrun` job when it is loaded with
`from_pretrained(..., distributed_config=DistributedConfig(...))`:

- expert parallel (`ep_size`): each rank's experts module keeps only its `E / ep_size` local experts
  (`module.num_experts` is the local count, `module._is_expert_parallel` is set, the weights are DTensors
  sharded on dim 0) and its `forward` is replaced by an `ep_forward` that sends every (token, expert) pair to
  the rank owning the expert (`AllToAllEP`), or, when the ranks share one batch, runs the local experts on
  the whole batch with the other ranks' experts masked as the sentinel id `num_local_experts` and sums the
  partial outputs (`AllReduceEP`). The routers stay global: top-k indices are global expert ids.
- tensor parallel (`tp_size`): every rank keeps every expert, with its intermediate dimension split
  (`gate_up_proj` packed-colwise, `down_proj` rowwise, both DTensors); the experts `forward` becomes a
  `tp_forward` that runs the stock kernel on the local shards and all-reduces the partial outputs.

allocmoe's experts override (patching.py) keeps calling that sharded forward when no slot is dropped, so a
full-K plan is the stock sharded model. When slots are dropped, `sparse_forward_for` gives the kernel that
computes only the real pairs *on every rank*:

- EP: the real pairs are compacted into P top-1 rows and handed to the stock `ep_forward`, so the all-to-all
  moves only real pairs and each rank's experts run only the surviving pairs routed to them; the call is made
  even when this rank has no pair (it is a collective).
- TP: allocmoe's own sparse kernels (experts_fast) run on the local weight shards (the DTensors swapped for
  their local tensors for the duration of the call, as transformers does) and the partial outputs are
  all-reduced over the tensor-parallel group: each rank runs its slice of every surviving pair.

Counting: the routers run on every rank, so each rank counts the pairs of the tokens it holds. After every
forward call of a sharded model, the handle (patching.py) all-reduces the per-layer pairs and tokens (and the per-expert
load) over the world and divides by the number of ranks that hold the same batch (the tensor-parallel size),
so `handle.counts()` gives the global figure, the same as one process on the same data. Under expert parallel
with FSDP the ranks are data-parallel: tokens and pairs are summed over ranks, activations per token is their
ratio.

Data parallel (profiling): `data_parallel()` says which batches this rank computes and `gather_rows` brings
every rank's per-batch accumulator rows to every rank, so they can be added in batch order (the same order
as one process).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch

from .adapters import find_moe_layers
from .adapters.sharding import expert_weights, experts_sharding, is_dtensor, to_local
from .errors import SettingsError


# --------------------------------------------------------------------------------------------------
# torch.distributed state
# --------------------------------------------------------------------------------------------------


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if initialized() else 1


def is_main() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    import os

    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group when launched by torchrun (idempotent). Returns whether it is up."""
    if initialized():
        return True
    if not launched_by_torchrun():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    torch.distributed.init_process_group(backend)
    return True


def local_rank() -> int:
    import os

    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device() -> str:
    """This process's device for a whole-model replica: cuda:LOCAL_RANK under torchrun on GPUs, else cpu."""
    if torch.cuda.is_available():
        return f"cuda:{local_rank()}" if launched_by_torchrun() else "cuda"
    return "cpu"


def _comm_device() -> torch.device:
    """Where collective buffers live (NCCL needs them on the GPU, gloo on the CPU)."""
    if initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# what kind of sharding a model has (one experts module's: adapters/sharding.py)
# --------------------------------------------------------------------------------------------------


def model_sharding(model) -> str | None:
    """"ep", "tp" or None for a model; raises for layouts allocmoe cannot handle (pipeline parallel)."""
    cfg = getattr(getattr(model, "config", None), "distributed_config", None)
    if cfg is not None and (getattr(cfg, "pp_size", 1) or 1) > 1:
        raise SettingsError("pipeline-parallel models are not supported (each rank holds only some layers); "
                            "use tensor or expert parallel", param="distributed_config")
    kinds = {experts_sharding(l.experts) for l in find_moe_layers(model)}
    kinds.discard(None)
    if not kinds:
        return None
    return "ep" if "ep" in kinds else "tp"


def batch_replicas(model) -> int:
    """How many ranks hold the same batch (the tensor-parallel size; 1 for plain data / expert parallel)."""
    cfg = getattr(getattr(model, "config", None), "distributed_config", None)
    tp = getattr(cfg, "tp_size", None) or getattr(model, "_tp_size", None) or 1
    return max(1, int(tp))


# --------------------------------------------------------------------------------------------------
# the sparse experts computation on sharded experts
# --------------------------------------------------------------------------------------------------


@contextmanager
def local_params(module):
    """Swap `module`'s DTensor parameters for their local shards for the duration (as transformers does)."""
    originals = {n: p for n, p in module._parameters.items() if p is not None and is_dtensor(p)}
    module._parameters.update({n: p.to_local() for n, p in originals.items()})
    try:
        yield module
    finally:
        module._parameters.update(originals)


def _ep_sparse_forward(module, hidden_states, top_k_index, top_k_weights, stock_forward=None, path=None,
                       *, num_experts: int):
    """Expert parallel: the real pairs as top-1 rows through the stock EP dispatch (always called)."""
    h, w = to_local(hidden_states), to_local(top_k_weights)
    tok, slot = (top_k_index >= 0).nonzero(as_tuple=True)
    ids = top_k_index[tok, slot]
    y = stock_forward(h[tok], ids.unsqueeze(1), w[tok, slot].unsqueeze(1))  # a collective: every rank calls it
    out = torch.zeros_like(h)
    if ids.numel():
        out.index_add_(0, tok, y.to(out.dtype))
    return out, int(ids.numel()), torch.bincount(ids, minlength=num_experts)


def _tp_sparse_forward(module, hidden_states, top_k_index, top_k_weights, stock_forward=None, path=None,
                       *, num_experts: int):
    """Tensor parallel: allocmoe's sparse kernels on the local shards, then one all-reduce of the partial sums."""
    from . import experts_fast

    h, w = to_local(hidden_states), to_local(top_k_weights)
    weight = expert_weights(module)
    group = weight.device_mesh.get_group() if is_dtensor(weight) else None
    with local_params(module):
        concrete = experts_fast.resolve_path(module, path or "follow", top_k_index.numel())
        if concrete == "reference":
            # the stock (TP-wrapped) forward on the compacted pairs; it reduces over the group itself
            return experts_fast.reference_sparse_forward(h, top_k_index, w, stock_forward, num_experts)
        out, n_pairs, per_expert = experts_fast.sparse_experts_forward(module, h, top_k_index, w, path=concrete,
                                                                       sync_free=False)
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(out, group=group)
    return out, int(n_pairs), per_expert


def sparse_forward_for(experts, num_experts: int):
    """The function computing only real pairs for this experts module (experts_fast's signature)."""
    from . import experts_fast

    kind = experts_sharding(experts)
    if kind == "ep":
        return partial(_ep_sparse_forward, num_experts=num_experts)
    if kind == "tp":
        return partial(_tp_sparse_forward, num_experts=num_experts)
    return experts_fast.sparse_experts_forward


# --------------------------------------------------------------------------------------------------
# global counts
# --------------------------------------------------------------------------------------------------


def count_replicas(model) -> int | None:
    """None unless `model` is sharded under torchrun; else how many ranks see each token of a call
    (what a sum of per-rank counts over all ranks must be divided by)."""
    if not initialized() or world_size() == 1 or model_sharding(model) is None:
        return None
    return batch_replicas(model)


def all_reduce_counts(flat: torch.Tensor, replicas: int) -> torch.Tensor:
    """Sum an int64 vector of per-rank counts over all ranks (a collective), divided by `replicas`."""
    flat = flat.to(torch.int64).to(_comm_device())
    torch.distributed.all_reduce(flat)
    return torch.div(flat, replicas, rounding_mode="floor").cpu()


# --------------------------------------------------------------------------------------------------
# data parallel (profiling)
# --------------------------------------------------------------------------------------------------


def data_parallel(model=None) -> tuple[int, int, int]:
    """(dp_rank, dp_size, replicas): this rank's share of the batches when ranks split calibration data.

    Unsharded models: every rank is its own data-parallel rank. Ranks of one tensor-parallel group (consecutive
    ranks, `tp` is the innermost mesh dimension) share a batch. Expert-parallel models: every forward is a
    collective of all ranks, so every rank runs every batch (the split buys memory, not time).
    """
    if not initialized():
        return 0, 1, 1
    world = world_size()
    kind = model_sharding(model) if model is not None else None
    if kind == "ep":
        return 0, 1, world  # every forward is a collective over all ranks: every rank runs every batch
    reps = batch_replicas(model) if kind == "tp" else 1
    if world % reps:
        raise SettingsError(f"{world} ranks cannot be split into tensor-parallel groups of {reps}")
    return rank() // reps, world // reps, reps


def gather_rows(row: torch.Tensor, replicas: int = 1) -> list[torch.Tensor]:
    """Every data-parallel rank's float64 `row`, in rank order (one all_gather over the world)."""
    if not initialized() or world_size() == 1:
        return [row]
    row = row.to(_comm_device()).contiguous()
    bufs = [torch.empty_like(row) for _ in range(world_size())]
    torch.distributed.all_gather(bufs, row)
    return [b.cpu() for b in bufs[::replicas]]


def barrier() -> None:
    if initialized() and world_size() > 1:
        torch.distributed.barrier()
