"""The timed workloads: prefill and decode phases on random token ids, the timer, and the experts-share probe.

- prefill: one forward over a [batch, len] batch of random token ids, with the KV cache on and
  `logits_to_keep=1` (what `generate` does for its prefill step: only the last position's logits).
- decode: a short prompt (not timed) fills a KV cache, then a manual loop of `tokens` steps
  `model(input_ids=next[:, None], cache=cache, use_cache=True)` is timed as a whole and reported per step.
  The fed tokens are a fixed random continuation (teacher forcing), the same for every config, so every
  config does the same work; greedy decoding would let each plan wander to other tokens.
- decoder-block time: a forward pre-hook on the first decoder layer and a forward hook on the last one
  (`allocmoe.adapters.decoder_layers`) time the decoder stack alone (embedding, final norm and LM head
  excluded).
- `measure_expert_share`: forward pre-hooks and hooks on every routed `experts` module of the model give
  the share of a step spent in routed experts (the f of the Amdahl limit).
"""

from __future__ import annotations

import gc
import inspect
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import decoder_layers, find_moe_layers
from ..errors import SettingsError, UnsupportedModelError


@dataclass
class Phase:
    name: str  # "prefill", "decode_b1", ...
    kind: str  # "prefill" | "decode"
    batch: int
    tokens: int  # prefill: sequence length; decode: timed decode steps
    prompt: int = 0  # decode: prompt length (untimed)

    def describe(self) -> str:
        if self.kind == "prefill":
            return f"prefill: one forward over {self.batch} x {self.tokens} tokens (KV cache on, logits_to_keep=1)"
        return (f"decode: batch {self.batch}, {self.tokens} KV-cache steps after a {self.prompt}-token prompt; "
                "time per step (one new token per sequence)")


def make_phases(prefill_batch: int, prefill_len: int, decode_batches, decode_tokens: int,
                decode_prompt: int) -> list[Phase]:
    phases = []
    if prefill_len and prefill_batch:
        phases.append(Phase("prefill", "prefill", int(prefill_batch), int(prefill_len)))
    for b in decode_batches or ():
        if decode_tokens:
            phases.append(Phase(f"decode_b{int(b)}", "decode", int(b), int(decode_tokens), int(decode_prompt)))
    if not phases:
        raise SettingsError("nothing to benchmark: prefill_len and decode_tokens are both 0 (or no decode_batches)",
                            param="prefill_len")
    return phases


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_ids(model: nn.Module, shape, seed: int, device) -> torch.Tensor:
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    lo = 3 if vocab > 16 else 0
    return torch.randint(lo, vocab - 1 if vocab > 16 else vocab, tuple(shape), generator=g).to(device)


def _cache_of(out):
    for name in ("cache", "past_key_values"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    raise UnsupportedModelError("the model returned no KV cache (use_cache=True): decode cannot be benchmarked")


class PhaseRunner:
    """Runs the phases on one model; times whole runs and the decoder stack."""

    def __init__(self, model: nn.Module, seed: int = 0):
        self.model = model
        self.device = next(model.parameters()).device
        self.seed = seed
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.logits_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.layers = decoder_layers(model)
        self.decoder_s = 0.0
        self._t0 = None
        self._inputs: dict = {}

    @contextmanager
    def decoder_timer(self):
        if not self.layers:
            yield
            return

        def pre(mod, args):
            sync(self.device)
            self._t0 = time.perf_counter()

        def post(mod, args, out):
            sync(self.device)
            if self._t0 is not None:
                self.decoder_s += time.perf_counter() - self._t0
                self._t0 = None

        hooks = [self.layers[0].register_forward_pre_hook(pre), self.layers[-1].register_forward_hook(post)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def inputs(self, phase: Phase):
        if phase.name not in self._inputs:
            if phase.kind == "prefill":
                self._inputs[phase.name] = (random_ids(self.model, (phase.batch, phase.tokens), self.seed, self.device),)
            else:
                prompt = random_ids(self.model, (phase.batch, phase.prompt), self.seed + 1, self.device)
                cont = random_ids(self.model, (phase.batch, phase.tokens), self.seed + 2, self.device)
                self._inputs[phase.name] = (prompt, cont)
        return self._inputs[phase.name]

    def run(self, phase: Phase, between=None, prompt_impl: str | None = None) -> tuple[float, float]:
        """(seconds, decoder seconds) of one timed run: the forward (prefill) or all decode steps.

        `between(stage)` is called with "start" right before the timed part (after the untimed prompt).
        `prompt_impl`: experts implementation for the untimed decode prompt (batched_mm copies one weight
        matrix per (token, expert) pair, too much memory for a whole prompt at real sizes).
        """
        m = self.model
        with torch.inference_mode():
            if phase.kind == "prefill":
                (ids,) = self.inputs(phase)
                if between:
                    between("start")
                return self._timed(lambda: m(input_ids=ids, use_cache=True, **self.logits_kw))
            prompt, cont = self.inputs(phase)
            cfg = m.config
            saved = getattr(cfg, "_experts_implementation", None)
            if prompt_impl and prompt_impl != saved:
                cfg._experts_implementation = prompt_impl
            try:
                out = m(input_ids=prompt, use_cache=True, **self.logits_kw)
            finally:
                if prompt_impl and prompt_impl != saved:
                    cfg._experts_implementation = saved
            cache = _cache_of(out)
            if between:
                between("start")

            def steps():
                nonlocal cache
                for i in range(phase.tokens):
                    cache = _cache_of(m(input_ids=cont[:, i:i + 1], use_cache=True, **{self.cache_kw: cache}))

            return self._timed(steps)

    def _timed(self, work) -> tuple[float, float]:
        """(seconds, decoder seconds) of `work()`, device-synchronised, with the garbage collector paused."""
        gc_was = gc.isenabled()
        gc.disable()
        try:
            self.decoder_s = 0.0
            sync(self.device)
            t = time.perf_counter()
            work()
            sync(self.device)
            return time.perf_counter() - t, self.decoder_s
        finally:
            if gc_was:
                gc.enable()


def measure_expert_share(model: nn.Module, phases: list[Phase], *, repeats: int = 3, warmup: int = 1,
                         seed: int = 0, progress: bool = True) -> dict:
    """Share of the step (and of the decoder stack) spent inside the routed `experts` modules, full model.

    {phase name: {"f", "f_min", "f_max", "f_decoder", "experts_median_s", "hooked_median_s",
    "hooked_decoder_median_s", "repeats"}}.
    """
    from tqdm.auto import tqdm

    runner = PhaseRunner(model, seed=seed)
    experts = [l.experts for l in find_moe_layers(model)]
    acc = {"s": 0.0, "t0": None}
    dev = runner.device

    def pre(mod, args, kwargs=None):
        sync(dev)
        acc["t0"] = time.perf_counter()

    def post(mod, args, out):
        sync(dev)
        acc["s"] += time.perf_counter() - acc["t0"]

    out = {}
    bar = tqdm(total=len(phases) * (warmup + repeats), disable=not progress, desc="amdahl", leave=False)
    hooks = []
    try:
        for e in experts:
            hooks.append(e.register_forward_pre_hook(pre))
            hooks.append(e.register_forward_hook(post))
        with runner.decoder_timer():
            for phase in phases:
                ts, tds, tes = [], [], []
                for rnd in range(warmup + repeats):
                    acc["s"] = 0.0
                    snap = {}
                    t, td = runner.run(phase, between=lambda s: snap.update(e0=acc["s"]))
                    bar.update(1)
                    if rnd >= warmup:
                        ts.append(t)
                        tds.append(td)
                        tes.append(acc["s"] - snap.get("e0", 0.0))
                fs = [e / t for e, t in zip(tes, ts)]
                fds = [e / d for e, d in zip(tes, tds) if d]
                out[phase.name] = {
                    "f": statistics.median(fs), "f_min": min(fs), "f_max": max(fs),
                    "f_decoder": statistics.median(fds) if fds else None,
                    "experts_median_s": statistics.median(tes), "hooked_median_s": statistics.median(ts),
                    "hooked_decoder_median_s": statistics.median(tds), "repeats": repeats,
                }
    finally:
        bar.close()
        for h in hooks:
            h.remove()
    return out
