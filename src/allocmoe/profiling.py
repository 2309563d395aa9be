"""Alloc-L sensitivity profiling: how much quality drops when MoE layer l alone runs top-k.

S[l][k] for k in k_values, with every other layer at its original K, measured on calibration windows
against the unmodified model, with two metrics (the `metric` every command and plan names) computed in the same pass:
  loss  mean increase of next-token NLL on the calibration text,
  kl    mean KL(p_full || p_candidate) of the next-token distributions.
At an operating point (`at=BUDGET`, operating_point.py) the other layers run that budget's allocation
instead of full K (`around=`): one more forward per batch, at the allocation, is cached and replayed.

Cost. The naive method runs a full forward for every (layer, k). The hidden states entering the
decoder layer that holds MoE layer l do not depend on k, so per calibration batch we run the full
model once (the reference, caching every decoder layer's output) and, for each candidate, replace
decoder layers before l by their cached outputs: only layers l..end (+ head) run again. k = K under
native weights is the reference itself (bitwise, see patching.py), so its row entry is 0 without a run.

Streaming and resume. Batches are processed one at a time; memory is bounded by one batch's
activations, its cached decoder outputs (num_decoder_layers x batch x seq x hidden) and its reference
log-probs (batch x seq x vocab). After every batch the float64 accumulators are written atomically
to `<out>.partial.json`; `resume=True` continues from there and, because the accumulation order is
the same, yields a byte-identical profile.

Data parallel. Under `torchrun` (torch.distributed initialised) rank r of N computes batches start+r,
start+r+N, ...; after each round the per-batch float64 rows of all ranks are gathered and added in batch
order, so the profile is the single-process one, byte for byte; rank 0 writes the partial and final files.
Sharded models: the ranks of a tensor-parallel group share batches; under expert parallel every rank runs
every batch (each forward is a collective). See distributed.py.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .adapters import decoder_layers, find_moe_layers
from .patching import apply
from .data import fingerprint_tokens
from .divergence import Reference, model_device
from .errors import FileFormatError, ProfileError
from .io import atomic_write_json, load_json
from .plan import check_fingerprint, fingerprint, full_plan
from .schema import PROFILE_FORMAT, PROFILE_VERSIONS, parse_profile

PROFILE_VERSION = PROFILE_VERSIONS[-1]  # the version this allocmoe writes (schema.py lists those it reads)
METRICS = ("kl", "loss")


@dataclass
class Profile:
    k_values: list[int]
    sensitivity: list[list[float]]  # [num_moe_layers][len(k_values)], lower is better
    metric: str
    tokens: int  # scored next-token predictions
    model: dict  # plan.fingerprint()
    data: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # every metric's matrix, same layout
    settings: dict = field(default_factory=dict)
    version: int = PROFILE_VERSION
    # where the other layers ran (operating_point.py): {"at": "full"} or the budget, allocation and rounds;
    # None: not recorded (every other layer at full K)
    operating_point: dict | None = None

    def to_dict(self) -> dict:
        d = {"format": PROFILE_FORMAT, "version": self.version, "metric": self.metric,
             "k_values": self.k_values, "sensitivity": self.sensitivity, "tokens": self.tokens,
             "metrics": self.metrics, "data": self.data, "settings": self.settings, "model": self.model}
        if self.operating_point is not None:
            d["operating_point"] = self.operating_point
        return d

    def save(self, path) -> None:
        atomic_write_json(path, self.to_dict())

    def with_metric(self, metric: str) -> "Profile":
        if metric not in self.metrics:
            raise ProfileError(f"profile has no {metric!r} matrix (has {', '.join(self.metrics)})")
        return Profile(self.k_values, self.metrics[metric], metric, self.tokens, self.model, self.data,
                       self.metrics, self.settings, operating_point=self.operating_point)

    @classmethod
    def from_dict(cls, d, source="profile") -> "Profile":
        """A profile from its JSON (a dict), checked against the profile schema (schema.py): types, finite
        values, one row per MoE layer aligned with k_values; `ProfileError` naming the field."""
        f = parse_profile(d, source)
        S = copy.deepcopy(d["sensitivity"])
        return cls(list(d["k_values"]), S, f.metric, f.tokens, copy.deepcopy(d["model"]),
                   copy.deepcopy(d.get("data") or {}), copy.deepcopy(d.get("metrics") or {f.metric: S}),
                   copy.deepcopy(d.get("settings") or {}), f.version,
                   copy.deepcopy(d.get("operating_point")))

    @classmethod
    def load(cls, src) -> "Profile":
        if isinstance(src, Profile):
            return src
        if isinstance(src, dict):
            return cls.from_dict(src)
        try:
            d = load_json(src, "profile file")
        except FileFormatError as e:
            raise ProfileError(str(e)) from None
        return cls.from_dict(d, source=f"profile {src}")

    def check_model(self, model: nn.Module) -> None:
        check_fingerprint(self.model, fingerprint(find_moe_layers(model), model), what="profile")


# ------------------------------------------------------------------------------------------------
# decoder-layer caching


def _decoder_layers(model: nn.Module, layers) -> tuple[list[nn.Module], list[int]]:
    """The decoder layers and the index of the decoder layer holding each MoE block."""
    decoder = decoder_layers(model)
    if not decoder or any(l.decoder_index is None for l in layers):
        raise ProfileError(f"cannot locate the decoder layer list that holds MoE block {layers[0].name}")
    return decoder, [l.decoder_index for l in layers]


class _Cache:
    """Capture every decoder layer's output in one pass, then replay the first d of them."""

    def __init__(self, decoder: list[nn.Module]):
        self.decoder = decoder
        self.outputs: list = [None] * len(decoder)

    def capture(self):
        hooks = []
        for i, layer in enumerate(self.decoder):
            def hook(mod, args, out, i=i):
                self.outputs[i] = out
            hooks.append(layer.register_forward_hook(hook))
        return hooks

    def replay_before(self, d: int):
        """Make decoder layers 0..d-1 return their cached outputs instead of computing."""
        # an instance forward already there (accelerate's offload hook, a sharding wrapper) is put back after
        self._saved = [self.decoder[i].__dict__.get("forward") for i in range(d)]
        for i in range(d):
            out = self.outputs[i]
            self.decoder[i].forward = types.MethodType(lambda self, *a, _o=out, **k: _o, self.decoder[i])

    def restore(self, d: int):
        for i in range(d):
            old = self._saved[i] if i < len(getattr(self, "_saved", [])) else None
            if old is None:
                self.decoder[i].__dict__.pop("forward", None)
            else:
                self.decoder[i].__dict__["forward"] = old


# ------------------------------------------------------------------------------------------------


def _batch_metrics(logits: torch.Tensor, ref: Reference, ref_nll: torch.Tensor,
                   targets: torch.Tensor) -> tuple[float, float]:
    """Summed (NLL increase, KL(full || candidate)) over all scored positions of a batch, in float64."""
    kl, logp = ref.kl(logits[:, :-1])
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float((nll.double() - ref_nll.double()).sum()), float(kl.double().sum())


def profile(model: nn.Module, windows: torch.Tensor, *, metric: str = "kl", k_from: int = 1,
            k_to: int | None = None, batch_size: int = 8, renormalize: str = "native", cached: bool = True,
            out: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
            data_info: dict | None = None, token_policy: str = "fixed", write=None, at=None,
            rounds: int | None = None, around: list[int] | None = None, window: int | str | None = "default"
            ) -> Profile:
    """Profile every MoE layer of `model` on token `windows` [N, seq_len] (see module docstring).

    `at` is the operating point (operating_point.py): None or "full" measures each layer with every other
    layer at full K; a budget (a fraction or activations per token) measures S[l][k] with every other layer
    at that budget's allocation (uniform first, then the DP plan, at most `rounds` profiles), KL to the full
    model. `around` (one k per MoE layer) is one such pass: the other layers at these k. `window`: with `at`,
    each round's candidate k lie within this many of its allocation (default operating_point.WINDOW; None:
    every k in k_from..k_to).

    `write`: how the finished profile's dict is written (default: to `out`; the CLI passes the writer of its
    checked output, which never clobbers a file that appeared meanwhile). `out` also names the partial file.

    `token_policy` profiles each layer under the policy that will be deployed (policy-aware profiling):
    S[l][k] is then the cost of layer l alone averaging k experts per token under that policy (`global`:
    the batch's tokens share k*T activations; calibrated policies: their knob tuned so layer l averages k
    on the calibration windows). The candidate k values are k_from..k_to (default: 1..the model's top-k),
    the per-layer counts a plan may choose; not the per-token floor and ceiling (`min_k`, `max_k`) of a
    token policy.
    """
    from .policies import get_policy

    if at is not None and not (isinstance(at, str) and at.strip().lower() == "full"):
        from .operating_point import profile_at

        return profile_at(_profile, model, windows, at, rounds=rounds, metric=metric, k_from=k_from, k_to=k_to,
                          batch_size=batch_size, renormalize=renormalize, cached=cached, out=out, resume=resume,
                          progress=progress, data_info=data_info, token_policy=token_policy, write=write,
                          **({} if window == "default" else {"window": window}))
    pol = get_policy(token_policy)
    if metric not in METRICS:
        raise ProfileError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")
    layers = find_moe_layers(model)
    K = max(l.top_k for l in layers)
    k_to = K if k_to is None else k_to
    if not (1 <= k_from <= k_to <= min(l.num_experts for l in layers)):
        raise ProfileError(f"invalid candidate k range [{k_from}, {k_to}]: need 1 <= k_from <= k_to <= number of "
                           "experts")
    k_values = list(range(k_from, k_to + 1))
    L, nk = len(layers), len(k_values)
    decoder, dec_idx = _decoder_layers(model, layers)
    settings = {"k_from": k_from, "k_to": k_to, "batch_size": batch_size, "seq_len": int(windows.shape[1]),
                "windows": int(windows.shape[0]), "renormalize": renormalize, "cached": cached,
                "token_policy": token_policy}
    if around is not None:
        if len(around) != L or any(k not in k_values for k in around):
            raise ProfileError(f"around must give one of the candidate k {k_values} per MoE layer ({L}), got "
                               f"{list(around)}", param="around")
        settings["around"] = [int(k) for k in around]
    data = dict(data_info or {}, fingerprint=fingerprint_tokens(windows))
    fp = fingerprint(layers, model)

    # accumulators (float64 python floats, summed in a fixed order -> resumable bit for bit)
    acc = {"loss": [[0.0] * nk for _ in range(L)], "kl": [[0.0] * nk for _ in range(L)]}
    tokens, start = 0, 0
    partial = Path(str(out) + ".partial.json") if out else None
    run_key = {"settings": {k: v for k, v in settings.items() if k != "cached"}, "data": data, "model": fp}
    if resume and partial is not None and partial.exists():
        st = load_json(partial, "partial profile")
        if st.get("run") != run_key:
            raise ProfileError(f"{partial} belongs to a different profiling run (other model, data or "
                               "settings); delete it or run without resume", param="resume")
        acc, tokens, start = st["acc"], st["tokens"], st["batches_done"]

    n_batches = math.ceil(windows.shape[0] / batch_size)
    # skip (l, K) under native weights: it *is* the reference model
    todo = [(l, j) for l in range(L) for j, k in enumerate(k_values)
            if not (k == layers[l].top_k and renormalize == "native" and pol.exact)]
    base_j = None  # operating point: (l, around[l]) is the surrounding allocation itself, run once per batch
    if around is not None:
        base_j = [k_values.index(k) for k in around]
        todo = [(l, j) for l in range(L) for j in range(nk) if j != base_j[l]]
    filled = todo + [(l, j) for l, j in enumerate(base_j or [])]
    knobs = None
    if pol.calibrated:
        from .calibration import layer_knobs

        knobs = layer_knobs(model, windows, k_values, token_policy, batch_size=batch_size, progress=progress)
        settings["knobs"] = knobs
    # data parallel under torchrun: rank r computes batches start+r, start+r+N, ...; every round's per-batch
    # rows are gathered and added in batch order, as one process would (see distributed.py)
    dp_rank, dp_size, reps = distributed.data_parallel(model)
    main = distributed.is_main()
    bar = tqdm(total=len(range(start + dp_rank, n_batches, dp_size)) * len(todo), disable=not progress or not main,
               desc="profiling", unit="cand", dynamic_ncols=True)
    dev = model_device(model)
    cache = _Cache(decoder)
    handle = apply(model, full_plan(model))
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for b0 in range(start, n_batches, dp_size):
                b = b0 + dp_rank
                row = torch.zeros(2 * L * nk + 1, dtype=torch.float64)  # this rank's batch: loss, kl, tokens
                if b < n_batches:
                    x = windows[b * batch_size:(b + 1) * batch_size].to(dev)
                    targets = x[:, 1:]
                    hooks = cache.capture() if cached and around is None else []
                    try:
                        ref = model(x, use_cache=False).logits
                    finally:
                        for h in hooks:
                            h.remove()
                    ref_logp = F.log_softmax(ref[:, :-1].float(), dim=-1)
                    ref_nll = -ref_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                    reference = Reference.from_logp(ref_logp)
                    del ref, ref_logp

                    def at_k(l, j):
                        return handle.override_layer(l, k=k_values[j], renormalize=renormalize,
                                                     token_policy=None if pol.exact else token_policy,
                                                     params={pol.param: knobs[l][j]} if knobs else None)

                    with contextlib.ExitStack() as surround:
                        if around is not None:  # every layer at its k of `around`; cache this run instead
                            for l in range(L):
                                surround.enter_context(at_k(l, base_j[l]))
                            hooks = cache.capture() if cached else []
                            try:
                                logits = model(x, use_cache=False).logits
                            finally:
                                for h in hooks:
                                    h.remove()
                            dl, dk = _batch_metrics(logits, reference, ref_nll, targets)
                            for l in range(L):
                                row[l * nk + base_j[l]], row[(L + l) * nk + base_j[l]] = dl, dk
                        for l, j in todo:
                            d = dec_idx[l] if cached else 0
                            cache.replay_before(d)
                            try:
                                with at_k(l, j):
                                    logits = model(x, use_cache=False).logits
                            finally:
                                cache.restore(d)
                            dl, dk = _batch_metrics(logits, reference, ref_nll, targets)
                            row[l * nk + j], row[(L + l) * nk + j] = dl, dk
                            bar.update(1)
                    row[-1] = targets.numel()
                    cache.outputs = [None] * len(decoder)
                for i, r in enumerate(distributed.gather_rows(row, reps)):
                    if b0 + i < n_batches:
                        for l, j in filled:
                            acc["loss"][l][j] += float(r[l * nk + j])
                            acc["kl"][l][j] += float(r[(L + l) * nk + j])
                        tokens += int(r[-1])
                if partial is not None and main:
                    atomic_write_json(partial, {"run": run_key, "batches_done": min(b0 + dp_size, n_batches),
                                                "tokens": tokens, "acc": acc})
    finally:
        handle.remove()
        bar.close()
    elapsed = time.perf_counter() - t0
    mats = {m: [[v / tokens for v in row] for row in acc[m]] for m in METRICS}
    prof = Profile(k_values, mats[metric], metric, tokens, fp, data, mats, settings)
    if at is not None:  # "full", asked for explicitly: recorded
        prof.operating_point = {"at": "full"}
    prof.elapsed_s = elapsed  # not serialised: the profile file is deterministic
    if out is not None and main:
        if write is None:
            prof.save(out)
        else:
            write(prof.to_dict())
        if partial is not None and partial.exists():
            partial.unlink()
    distributed.barrier()
    return prof


_profile = profile  # the passes of an operating-point profile call this one, whatever `profile` is rebound to
