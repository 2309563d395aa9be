"""The experts computation for calls where some routing slots are dropped (index -1).

`allocmoe.apply` keeps the stock experts forward for calls where every slot is real (so a full-K plan is
bitwise identical to the original model). When a token policy or padding drops slots, it calls
`sparse_experts_forward`, which runs only the real (token, expert) pairs:

1. one sort of the flattened [T*M] expert ids, with dropped slots keyed as the sentinel E so they sort
   to the tail; one bincount gives the pairs per expert (and the per-expert load allocmoe counts);
2. one gather of the hidden states of the real pairs, already in expert order (the earlier path gathered
   once to compact and again inside the stock grouped_mm to sort);
3. the expert matmuls on these rows, one kernel per projection (`grouped`), or one matmul per active
   expert (`loop`, what the stock `eager` does), or one weight copy per pair (`batched`, the stock
   `batched_mm`);
4. the routing weights applied, and one `index_add_` back to the tokens (no inverse permutation).

Which kernel is used (`sparse path`):
- `follow` (default): the same family as `config._experts_implementation` selects for dense calls:
  grouped_mm -> grouped, eager -> loop, batched_mm -> batched, allocmoe -> auto; any other (custom)
  implementation -> reference. Dense and sparse calls of one model then use the same matmul kernels, so
  the fixed and the token policies are compared like for like.
- `auto`: per call, `loop` when the call has at most AUTO_LOOP_MAX_PAIRS slots (decode: the stock CPU
  grouped kernel walks all E experts, empty or not) and `grouped` otherwise (prefill).
- `grouped` | `loop` | `batched`: always that one.
- `reference`: the previous path (compact, then call the stock experts forward on the pairs as top-1
  tokens); kept as the oracle the tests compare against.
Choose it with `allocmoe.apply(model, plan, sparse_path=...)` (or the handle's `sparse_path`); the default
is the environment variable `ALLOCMOE_SPARSE_EXPERTS`, else `follow`.

`register_experts_implementation()` also registers these kernels with transformers as the experts
implementation "allocmoe" (`auto` for every call, dense or not), so the full model can run them too.

Host syncs: on CPU they cost nothing and the number of real pairs P is read once (`int(...)`) to slice
the sorted pairs. On an accelerator the grouped kernel runs on all T*M sorted rows instead, with the
dropped (sentinel) rows at the tail excluded by the offsets and masked afterwards, as transformers
does for expert-parallel sentinels, so the matmul path itself needs no sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SPARSE_PATHS = ("follow", "auto", "grouped", "loop", "batched", "reference")
IMPL_NAME = "allocmoe"  # the experts implementation `register_experts_implementation` adds to transformers
_IMPL_TO_PATH = {"grouped_mm": "grouped", "eager": "loop", "batched_mm": "batched", IMPL_NAME: "auto"}
AUTO_LOOP_MAX_PAIRS = 16  # `auto`: calls with at most this many (token, slot) pairs use the loop path

def sparse_path_or_default(name: str | None = None) -> str:
    """`name`, or the path `apply` uses when none is given ($ALLOCMOE_SPARSE_EXPERTS, else `follow`);
    SettingsError if it is not one of SPARSE_PATHS."""
    import os

    from .errors import SettingsError

    path = name or os.environ.get("ALLOCMOE_SPARSE_EXPERTS", "follow")
    if path not in SPARSE_PATHS:
        raise SettingsError(f"unknown sparse experts path {path!r} (choose from {', '.join(SPARSE_PATHS)})",
                            param="sparse_path")
    return path


def supports_fast(module) -> bool:
    """Whether `module` is a transformers experts bank this module knows how to compute directly."""
    if getattr(module, "_is_expert_parallel", False):
        return False
    if not all(hasattr(module, a) for a in ("num_experts", "has_gate", "has_bias", "is_transposed")):
        return False
    if not hasattr(module, "_apply_gate" if module.has_gate else "act_fn"):
        return False
    up = "gate_up_proj" if module.has_gate else "up_proj"
    return isinstance(getattr(module, up, None), torch.Tensor) and isinstance(getattr(module, "down_proj", None),
                                                                              torch.Tensor)


def resolve_path(module, path: str, n_pairs: int | None = None) -> str:
    """The concrete path (`grouped`, `loop`, `batched` or `reference`) for one call of `module`."""
    if path == "reference" or not supports_fast(module):
        return "reference"
    if path == "follow":
        impl = getattr(getattr(module, "config", None), "_experts_implementation", None) or "eager"
        path = _IMPL_TO_PATH.get(impl, "reference")
    if path == "auto":
        return "loop" if n_pairs is not None and n_pairs <= AUTO_LOOP_MAX_PAIRS else "grouped"
    return path


# --------------------------------------------------------------------------------------------------
# pair compaction
# --------------------------------------------------------------------------------------------------


def sort_pairs(top_k_index: torch.Tensor, num_experts: int):
    """Sort the flattened slots by expert, dropped slots (index < 0) last.

    Returns (sorted_ids [T*M], perm [T*M], counts [E+1]); counts[E] is the number of dropped slots.
    """
    flat = top_k_index.reshape(-1)
    key = flat.masked_fill(flat < 0, num_experts)
    sorted_ids, perm = torch.sort(key, stable=True)
    counts = torch.bincount(sorted_ids, minlength=num_experts + 1)
    return sorted_ids, perm, counts


def _proj(module, which: str):
    if which == "up":
        name = "gate_up_proj" if module.has_gate else "up_proj"
    else:
        name = "down_proj"
    w = getattr(module, name)
    b = getattr(module, name + "_bias", None) if module.has_bias else None
    return w, b


def _activate(module, h: torch.Tensor) -> torch.Tensor:
    return module._apply_gate(h) if module.has_gate else module.act_fn(h)


def _post(module, y: torch.Tensor) -> torch.Tensor:
    if getattr(module, "has_post_expert_norm", False):
        y = module.post_expert_norm(y)
    return y


# --------------------------------------------------------------------------------------------------
# kernels over expert-sorted rows x [P, H] with experts ids e [P] and per-expert counts [E]
# --------------------------------------------------------------------------------------------------


def _grouped_rows(module, x: torch.Tensor, e: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    from transformers.integrations.moe import _grouped_linear

    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    w, b = _proj(module, "up")
    h = _grouped_linear(x, w, offs, bias=None if b is None else b[e], is_transposed=module.is_transposed)
    h = _activate(module, h)
    w, b = _proj(module, "down")
    y = _grouped_linear(h, w, offs, bias=None if b is None else b[e], is_transposed=module.is_transposed)
    return _post(module, y)


def _linear(x, w, b, transposed: bool):
    y = x @ w if transposed else F.linear(x, w)
    return y if b is None else y + b


def _loop_rows(module, x: torch.Tensor, e: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    wu, bu = _proj(module, "up")
    wd, bd = _proj(module, "down")
    t = module.is_transposed
    out_dim = wd.shape[-1] if t else wd.shape[-2]
    y = x.new_empty(x.shape[0], out_dim)
    start = 0
    for ex, n in enumerate(counts.tolist()):  # one host read of the counts
        if n == 0:
            continue
        end = start + n
        h = _activate(module, _linear(x[start:end], wu[ex], None if bu is None else bu[ex], t))
        y[start:end] = _post(module, _linear(h, wd[ex], None if bd is None else bd[ex], t))
        start = end
    return y


def _batched_rows(module, x: torch.Tensor, e: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    from transformers.integrations.moe import _batched_linear

    w, b = _proj(module, "up")
    h = _batched_linear(x, w[e], bias=None if b is None else b[e], is_transposed=module.is_transposed)
    h = _activate(module, h)
    w, b = _proj(module, "down")
    y = _batched_linear(h, w[e], bias=None if b is None else b[e], is_transposed=module.is_transposed)
    return _post(module, y)


KERNELS = {"grouped": _grouped_rows, "loop": _loop_rows, "batched": _batched_rows}


# --------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------


def sparse_experts_forward(module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor, stock_forward=None, path: str | None = None,
                           sync_free: bool | None = None):
    """Experts output [T, H] computing only the slots with index >= 0.

    Returns (output, n_pairs, per_expert_counts [E]); n_pairs is an int, or a 0-d tensor on the sync-free
    path. `stock_forward` (the experts module's own forward) is needed only by the `reference` path.
    `sync_free` (default: on accelerators) runs the grouped kernel on all sorted rows, sentinels masked.
    """
    E = module.num_experts
    M = top_k_index.shape[-1]
    if path is None:
        path = resolve_path(module, "follow", top_k_index.numel())  # `auto` decides on the slot count (no sync)
    elif path == "auto":
        path = "loop" if top_k_index.numel() <= AUTO_LOOP_MAX_PAIRS else "grouped"
    if path == "reference":
        return reference_sparse_forward(hidden_states, top_k_index, top_k_weights, stock_forward, E)
    sorted_ids, perm, counts = sort_pairs(top_k_index, E)
    out = torch.zeros_like(hidden_states)
    w_flat = top_k_weights.reshape(-1)
    if sync_free is None:
        sync_free = hidden_states.device.type != "cpu"
    if not sync_free or path != "grouped":
        n_pairs = int(perm.numel() - counts[E])  # host read; free on CPU
        if n_pairs == 0:
            return out, 0, counts[:E]
        perm = perm[:n_pairs]
        e = sorted_ids[:n_pairs]
        tok = torch.div(perm, M, rounding_mode="floor")
        y = KERNELS[path](module, hidden_states[tok], e, counts[:E])
        w = w_flat[perm].unsqueeze(-1)
        y = y.mul_(w) if (y.dtype == w.dtype and not y.requires_grad) else y * w  # y is a fresh buffer
        out.index_add_(0, tok, y.to(out.dtype))
        return out, n_pairs, counts[:E]
    # accelerator, grouped: all T*M rows; sentinel rows (dropped) sit past offs[-1] and are masked
    tok = torch.div(perm, M, rounding_mode="floor")
    e = sorted_ids.clamp(max=E - 1)
    dropped = (sorted_ids >= E).unsqueeze(-1)
    y = _grouped_rows(module, hidden_states[tok], e, counts[:E])
    y = (y * w_flat[perm].unsqueeze(-1)).masked_fill(dropped, 0.0)
    out.index_add_(0, tok, y.to(out.dtype))
    return out, counts[:E].sum(), counts[:E]


def reference_sparse_forward(hidden_states, top_k_index, top_k_weights, stock_forward, num_experts: int):
    """The oracle: compact the real pairs and run the stock experts forward on them as top-1 tokens."""
    tok, slot = (top_k_index >= 0).nonzero(as_tuple=True)
    flat = top_k_index[tok, slot]
    out = torch.zeros_like(hidden_states)
    if flat.numel():
        pair_out = stock_forward(hidden_states[tok], flat.unsqueeze(1), top_k_weights[tok, slot].unsqueeze(1))
        out.index_add_(0, tok, pair_out.to(out.dtype))
    return out, int(flat.numel()), torch.bincount(flat, minlength=num_experts)


# --------------------------------------------------------------------------------------------------
# the same kernels as a transformers experts implementation (dense calls too)
# --------------------------------------------------------------------------------------------------


def allocmoe_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """`config._experts_implementation = "allocmoe"`: the `auto` kernels for every call, dense or not
    (slots with index < 0 or >= num_experts are skipped). Lets the full model use the same kernels as
    allocmoe's sparse path, for like-for-like comparisons."""
    if not supports_fast(self):
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    idx = top_k_index.masked_fill(top_k_index >= self.num_experts, -1)
    return sparse_experts_forward(self, hidden_states, idx, top_k_weights, path="auto")[0]


def register_experts_implementation(name: str = IMPL_NAME) -> str:
    """Register `allocmoe_experts_forward` with transformers' ExpertsInterface (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if name not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(name, allocmoe_experts_forward)
    return name
