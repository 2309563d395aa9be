"""Speed: prefill and decode timings of the full model and of plans, measured in one process, interleaved.

    result = run_bench(model, {"half": plan, "half-global": plan2})
    amdahl(model, result)            # adds result["amdahl"]: share of time in routed experts, ideal vs achieved
    print(format_table(result))

What is measured (every figure comes from this run; nothing is hard-coded):
- prefill: one forward over a [prefill_batch, prefill_len] batch of random token ids, with the KV cache
  on and `logits_to_keep=1` (what `generate` does for its prefill step: only the last position's
  logits are computed).
- decode: a short prompt (`decode_prompt` tokens, not timed) fills a KV cache, then a manual loop of
  `decode_tokens` steps `model(input_ids=next[:, None], cache=cache, use_cache=True)` is timed as a whole
  and reported per step (one new token per sequence). The fed tokens are a fixed random continuation
  (teacher forcing), the same for every config, so every config does the same work; greedy decoding
  would let each plan wander to other tokens.
- runs are interleaved: each round runs every config once (full, plan A, plan B, ...; the starting
  config rotates each round), the first `warmup` rounds are discarded, and median / min / max are
  reported per config. Speed-up = full median / plan median; `speedup_of_mins` = full min / plan min
  is reported beside it (on a shared machine other processes only ever add time).
- decoder-block time: a forward pre-hook on the first decoder layer and a forward hook on the last
  one, in every run, time the decoder stack alone (embedding, final norm and LM head excluded). The
  decoder-only speed-up is the same ratio of medians over that time.
- activations per token: measured by the applied plan's counters over the timed runs (decode: the
  decode steps only); for the full model, from one extra untimed run with `allocmoe.full_plan`.

`amdahl` runs the full model (unpatched) again with a forward pre-hook and hook on every routed
`experts` module (two `time.perf_counter` calls and the hook dispatch, a few microseconds per call; the
measured step time with the hooks is reported next to the unhooked one) to get the share f of the step
spent in routed experts, and reports the ideal speed-up of a plan that cuts activations from A_full to
A_plan, 1 / ((1 - f) + f * A_plan / A_full), next to the achieved one. It does so for the whole step
and for the decoder stack alone (f_decoder = experts time / decoder time).
"""

from __future__ import annotations

import gc
import inspect
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import importlib

from . import __version__
from .adapters import find_moe_layers
from .apply import apply
from .errors import AllocMoeError
from .plan import Plan, full_plan

BENCH_FORMAT = "allocmoe-bench"
BENCH_VERSION = 1
FULL = "full"
# the module (the package re-exports the function `apply` under the same name)
apply_mod = importlib.import_module(__package__ + ".apply")


# --------------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(model: nn.Module) -> dict:
    import transformers

    from . import experts_fast

    p = next(model.parameters())
    env = {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "allocmoe": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": str(p.device),
        "dtype": str(p.dtype).replace("torch.", ""),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "sparse_experts_path": experts_fast.get_sparse_path(),
        "count_experts": bool(apply_mod.COUNT_EXPERTS),
        "model": str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        "architecture": (getattr(model.config, "architectures", None) or [type(model).__name__])[0],
    }
    if p.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(p.device)
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------------------------------


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
        raise AllocMoeError("nothing to benchmark: prefill_len and decode_tokens are both 0")
    return phases


def _random_ids(model: nn.Module, shape, seed: int, device) -> torch.Tensor:
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    lo = 3 if vocab > 16 else 0
    return torch.randint(lo, vocab - 1 if vocab > 16 else vocab, tuple(shape), generator=g).to(device)


class _Runner:
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
            _sync(self.device)
            self._t0 = time.perf_counter()

        def post(mod, args, out):
            _sync(self.device)
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
                self._inputs[phase.name] = (_random_ids(self.model, (phase.batch, phase.tokens), self.seed, self.device),)
            else:
                prompt = _random_ids(self.model, (phase.batch, phase.prompt), self.seed + 1, self.device)
                cont = _random_ids(self.model, (phase.batch, phase.tokens), self.seed + 2, self.device)
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
            _sync(self.device)
            t = time.perf_counter()
            work()
            _sync(self.device)
            return time.perf_counter() - t, self.decoder_s
        finally:
            if gc_was:
                gc.enable()


def _cache_of(out):
    for name in ("cache", "past_key_values"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    raise AllocMoeError("the model returned no KV cache (use_cache=True): decode cannot be benchmarked")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layer list (model.model.layers or the first ModuleList of num_hidden_layers blocks)."""
    n = getattr(model.config, "num_hidden_layers", None)
    base = getattr(model, "model", None)
    cand = getattr(base, "layers", None) if base is not None else None
    if isinstance(cand, nn.ModuleList) and len(cand):
        return list(cand)[: n or len(cand)]
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and n and len(mod) == n:
            return list(mod)
    return []


# --------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------


def _summary(times: list[float]) -> dict:
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "max_s": max(times),
            "spread_pct": 100.0 * (max(times) - min(times)) / med if med else 0.0}


def ideal_speedup(f: float, a_plan: float, a_full: float) -> float:
    """Amdahl: a share f of the time scales with activations, which fall from a_full to a_plan."""
    if a_full <= 0:
        raise ValueError("a_full must be positive")
    return 1.0 / ((1.0 - f) + f * a_plan / a_full)


def _plan_summary(plan: Plan | None) -> dict | None:
    if plan is None:
        return None
    d = {"policy": plan.policy, "method": plan.method, "ks": plan.ks,
         "planned_activations_per_token": sum(plan.ks), "original_activations_per_token": sum(plan.original_ks),
         "planned_fraction": round(sum(plan.ks) / max(1, sum(plan.original_ks)), 6)}
    if plan.policy != "fixed":
        d["token_policy"] = dict(plan.token_policy)
    return d


def _batched_bytes(model: nn.Module, pairs: int) -> int:
    """Bytes the stock batched_mm gathers for `pairs` (token, expert) pairs (one weight copy per pair)."""
    layers = find_moe_layers(model)
    if not layers:
        return 0
    ex = layers[0].experts
    per = sum(p.numel() * p.element_size() for p in ex.parameters()) // max(1, layers[0].num_experts)
    return per * pairs


# --------------------------------------------------------------------------------------------------
# run_bench
# --------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """A benchmark config beyond a bare plan: the plan (None = unpatched) under a given experts
    implementation (`config._experts_implementation`) and/or allocmoe sparse experts path."""

    plan: object = None
    experts_implementation: str | None = None
    sparse_path: str | None = None


@dataclass
class _Config:
    name: str
    plan_name: str
    plan: Plan | None
    impl: str | None
    sparse: str | None
    ref: str = ""


def _configs(model: nn.Module, plans: dict, implementations) -> tuple[list[_Config], str]:
    layers = find_moe_layers(model)
    raw = {}
    for name, v in plans.items():
        if not isinstance(v, Variant):
            v = Variant(plan=v)
        plan = None if v.plan is None else Plan.load(v.plan)
        if plan is not None:
            plan.check_model(layers, model)
        raw[name] = (plan, v.experts_implementation, v.sparse_path)
    if not any(p is None for p, _, _ in raw.values()):
        raw = {FULL: (None, None, None), **raw}
    configs = []
    for impl in (list(implementations) if implementations else [None]):
        for name, (p, vi, sp) in raw.items():
            i = impl if impl is not None else vi
            configs.append(_Config(name if impl is None else f"{name}@{impl}", name, p, i, sp))
    fulls = [c for c in configs if c.plan is None]
    ref_name = fulls[0].name
    for c in configs:  # ratios against the unpatched model under the same experts implementation
        same = [f for f in fulls if f.impl == c.impl and f.sparse is None]
        c.ref = same[0].name if same else ref_name
    return configs, ref_name


def run_bench(model: nn.Module, plans: dict, *, prefill_batch: int = 1, prefill_len: int = 256,
              decode_batches=(1, 8), decode_tokens: int = 32, decode_prompt: int = 16, repeats: int = 5,
              warmup: int = 1, threads: int | None = None, progress: bool = True, seed: int = 0,
              implementations: list[str] | tuple[str, ...] | None = None, count_experts: bool = False,
              batched_mm_max_bytes: int = 4 << 30) -> dict:
    """Time prefill and decode for the full model and each plan; see the module docstring.

    plans: {name: Plan | dict | path | None | Variant}; None means the unpatched model (if no entry is
    None, the full model is added as "full"); a `Variant` also fixes the experts implementation and/or
    the allocmoe sparse path of that config. `implementations` (optional): experts implementations to
    compare (e.g. ["grouped_mm", "eager", "batched_mm"]); every config then runs under each, named
    "name@impl". Ratios of a config are taken against the unpatched model under the same experts
    implementation (its `reference`); `vs_reference_full` compares with the first unpatched config.
    batched_mm configs whose weight gather would exceed `batched_mm_max_bytes` per layer are skipped
    (reported); their decode prompt runs under the model's own implementation (untimed).
    `count_experts=False` turns off the per-expert load counter during the runs (the pair counts that
    give activations stay on).
    """
    from tqdm.auto import tqdm

    from . import experts_fast

    if repeats < 1 or warmup < 0:
        raise AllocMoeError("repeats must be >= 1 and warmup >= 0")
    configs, ref_name = _configs(model, plans, implementations)
    layers = find_moe_layers(model)
    orig_impl = getattr(model.config, "_experts_implementation", None)
    orig_sparse = experts_fast.get_sparse_path()
    phases = make_phases(prefill_batch, prefill_len, decode_batches, decode_tokens, decode_prompt)

    old_threads = torch.get_num_threads()
    old_count = apply_mod.COUNT_EXPERTS
    if threads:
        torch.set_num_threads(int(threads))
    apply_mod.COUNT_EXPERTS = bool(count_experts)
    runner = _Runner(model, seed=seed)
    fulls = [c for c in configs if c.plan is None]
    total = len(phases) * ((warmup + repeats) * len(configs) + len(fulls))
    bar = tqdm(total=total, disable=not progress, desc="bench", leave=False)
    try:
        env = environment(model)
        result = {
            "format": BENCH_FORMAT, "version": BENCH_VERSION,
            "env": env,
            "settings": dict(prefill_batch=prefill_batch, prefill_len=prefill_len,
                             decode_batches=list(decode_batches or ()), decode_tokens=decode_tokens,
                             decode_prompt=decode_prompt, repeats=repeats, warmup=warmup, seed=seed,
                             implementations=list(implementations or []), count_experts=count_experts,
                             interleaving="each round runs every config once, the first config rotating",
                             decode_method="manual loop model(input_ids=next, cache=cache, use_cache=True), "
                                           "teacher-forced fixed random continuation",
                             decoder_time="forward pre-hook on the first decoder layer, hook on the last"),
            "reference": ref_name,
            "configs": {c.name: {"plan": c.plan_name, "experts_implementation": c.impl or orig_impl,
                                 "sparse_path": c.sparse or orig_sparse, "reference": c.ref,
                                 **({"summary": _plan_summary(c.plan)} if c.plan is not None else {})}
                        for c in configs},
            "phases": {},
        }
        with runner.decoder_timer():
            for phase in phases:
                rows = {c.name: {"times_s": [], "decoder_times_s": [], "activations_per_token": None}
                        for c in configs}
                skipped = {}
                for c in configs:
                    if c.impl == "batched_mm":
                        acts = sum(l.top_k for l in layers) if c.plan is None else max(sum(c.plan.ks),
                                                                                        sum(c.plan.original_ks))
                        per_call = phase.batch * (phase.tokens if phase.kind == "prefill" else 1)
                        need = _batched_bytes(model, per_call * acts // max(1, len(layers)))
                        if need > batched_mm_max_bytes:
                            skipped[c.name] = (f"not run: batched_mm would gather {need / 2**30:.1f} GiB of expert "
                                               f"weights per layer (limit {batched_mm_max_bytes / 2**30:.1f} GiB)")
                # activations of the unpatched configs: one untimed counting run with full_plan
                for c in fulls:
                    bar.update(1)
                    if c.name in skipped:
                        continue
                    with _variant(model, c), apply(model, full_plan(model)) as h:
                        rows[c.name]["activations_per_token"] = _measure_acts(runner, phase, h,
                                                                              _prompt_impl(c.impl, orig_impl))
                for rnd in range(warmup + repeats):
                    k = rnd % len(configs)
                    for c in configs[k:] + configs[:k]:
                        bar.update(1)
                        if c.name in skipped:
                            continue
                        pimpl = _prompt_impl(c.impl, orig_impl)
                        with _variant(model, c):
                            if c.plan is None:
                                t, td = runner.run(phase, prompt_impl=pimpl)
                            else:
                                with apply(model, c.plan) as h:
                                    snap = {}
                                    t, td = runner.run(phase, between=lambda s, h=h, snap=snap: snap.update(
                                        before=_pairs_tokens(h)), prompt_impl=pimpl)
                                    rows[c.name].setdefault("_acts", []).append(_acts_since(h, snap["before"]))
                        if rnd >= warmup:
                            rows[c.name]["times_s"].append(t)
                            rows[c.name]["decoder_times_s"].append(td)
                result["phases"][phase.name] = _phase_result(phase, rows, skipped, configs, ref_name)
    finally:
        bar.close()
        apply_mod.COUNT_EXPERTS = old_count
        if orig_impl is not None:
            _set_impl(model, orig_impl)
        experts_fast.set_sparse_path(orig_sparse)
        torch.set_num_threads(old_threads)
    return result


@contextmanager
def _variant(model: nn.Module, c: _Config):
    from . import experts_fast

    old_impl = model.config._experts_implementation
    old_sparse = experts_fast.get_sparse_path()
    if c.impl is not None:
        _set_impl(model, c.impl)
    if c.sparse is not None:
        experts_fast.set_sparse_path(c.sparse)
    try:
        yield
    finally:
        if c.impl is not None:
            _set_impl(model, old_impl)
        experts_fast.set_sparse_path(old_sparse)


def _set_impl(model: nn.Module, impl: str) -> None:
    """Select the experts implementation (`set_experts_implementation` when the model has it)."""
    if impl == getattr(model.config, "_experts_implementation", None):
        return
    from . import experts_fast

    if impl == experts_fast.IMPL_NAME:
        experts_fast.register_experts_implementation()
    if hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation(impl)
        except (ValueError, ImportError, KeyError) as e:
            raise AllocMoeError(f"experts implementation {impl!r} is not available: {str(e).splitlines()[0]}") from None
    if getattr(model.config, "_experts_implementation", None) != impl:
        model.config._experts_implementation = impl  # the experts modules read the config on every call


def _pairs_tokens(h) -> tuple[int, int]:
    return sum(s.pairs_total for s in h.states), max((s.tokens_total for s in h.states), default=0)


def _acts_since(h, before) -> tuple[int, int]:
    pairs, tokens = _pairs_tokens(h)
    return pairs - before[0], tokens - before[1]


def _prompt_impl(impl: str | None, orig: str | None) -> str | None:
    if impl != "batched_mm":
        return None
    return orig if orig and orig != "batched_mm" else "grouped_mm"


def _measure_acts(runner: _Runner, phase: Phase, h, prompt_impl: str | None = None) -> float:
    snap = {}
    runner.run(phase, between=lambda s: snap.update(before=_pairs_tokens(h)), prompt_impl=prompt_impl)
    pairs, tokens = _acts_since(h, snap["before"])
    return pairs / tokens if tokens else 0.0


def _phase_result(phase: Phase, rows: dict, skipped: dict, configs: list[_Config], ref_name: str) -> dict:
    out = {"description": phase.describe(), **asdict(phase), "configs": {}}
    for c in configs:
        r = rows[c.name]
        if c.name in skipped:
            out["configs"][c.name] = {"skipped": skipped[c.name]}
            continue
        acts = r.pop("_acts", None)
        if acts is not None:
            pairs, tokens = sum(a[0] for a in acts), sum(a[1] for a in acts)
            r["activations_per_token"] = pairs / tokens if tokens else 0.0
        d = {"times_s": r["times_s"], **_summary(r["times_s"]),
             "decoder_times_s": r["decoder_times_s"],
             **{f"decoder_{k}": v for k, v in _summary(r["decoder_times_s"]).items()},
             "activations_per_token": r["activations_per_token"]}
        if phase.kind == "decode":
            d["ms_per_step"] = 1e3 * d["median_s"] / phase.tokens
        d["tokens_per_s"] = phase.batch * phase.tokens / d["median_s"]
        out["configs"][c.name] = d
    first = out["configs"].get(ref_name, {})
    for c in configs:
        d = out["configs"][c.name]
        if "skipped" in d:
            continue
        ref = out["configs"].get(c.ref, {})
        if "median_s" in ref:
            d["speedup"] = ref["median_s"] / d["median_s"]
            d["decoder_speedup"] = (ref["decoder_median_s"] / d["decoder_median_s"]) if d["decoder_median_s"] else None
            # ratio of the fastest runs: other processes on a shared machine only ever add time
            d["speedup_of_mins"] = ref["min_s"] / d["min_s"]
            d["decoder_speedup_of_mins"] = (ref["decoder_min_s"] / d["decoder_min_s"]) if d["decoder_min_s"] else None
            a_full = ref.get("activations_per_token")
            if a_full and d["activations_per_token"] is not None:
                d["activation_fraction"] = d["activations_per_token"] / a_full
        if c.ref != ref_name and "median_s" in first:
            d["vs_reference_full"] = first["median_s"] / d["median_s"]
    return out


# --------------------------------------------------------------------------------------------------
# Amdahl
# --------------------------------------------------------------------------------------------------


def measure_expert_share(model: nn.Module, phases: list[Phase], *, repeats: int = 3, warmup: int = 1,
                         seed: int = 0, progress: bool = True) -> dict:
    """Share of the step (and of the decoder stack) spent inside the routed `experts` modules, full model."""
    from tqdm.auto import tqdm

    runner = _Runner(model, seed=seed)
    experts = [l.experts for l in find_moe_layers(model)]
    acc = {"s": 0.0, "t0": None}
    dev = runner.device

    def pre(mod, args, kwargs=None):
        _sync(dev)
        acc["t0"] = time.perf_counter()

    def post(mod, args, out):
        _sync(dev)
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


def _share_for(share: dict, impl: str | None, phase: str) -> dict | None:
    """share is {phase: {...}} (one implementation) or {"by_implementation": {impl: {phase: {...}}}}."""
    if "by_implementation" in share:
        by = share["by_implementation"]
        sub = by.get(impl) or by.get(share.get("default")) or next(iter(by.values()))
        return sub.get(phase)
    return share.get(phase)


def amdahl(model: nn.Module | None, result: dict, *, share: dict | None = None, repeats: int = 3,
           warmup: int = 1, threads: int | None = None, progress: bool = True) -> dict:
    """Ideal (Amdahl) vs achieved speed-up of every plan in `result`, per phase; stored in result["amdahl"].

    `share` ({phase: {"f": .., "f_decoder": ..}}) skips the measurement (tests, or a share measured
    elsewhere); otherwise it is measured on `model` (full, unpatched) with the phases of `result`, once
    per experts implementation that `result` compares (f depends on the kernels).
    """
    s = result["settings"]
    phases = make_phases(s["prefill_batch"], s["prefill_len"], s["decode_batches"], s["decode_tokens"],
                         s["decode_prompt"])
    phases = [p for p in phases if p.name in result["phases"]]
    default_impl = result["env"].get("experts_implementation")
    if share is None:
        if model is None:
            raise AllocMoeError("amdahl needs the model to measure the experts' share of the time")
        impls = []
        for c, meta in result["configs"].items():
            i = meta.get("experts_implementation")
            if meta.get("summary") is None and i not in impls:
                impls.append(i)
        old = torch.get_num_threads()
        old_impl = getattr(model.config, "_experts_implementation", None)
        if threads or result["env"].get("threads"):
            torch.set_num_threads(int(threads or result["env"]["threads"]))
        by = {}
        try:
            for impl in impls:
                if impl is not None:
                    _set_impl(model, impl)
                todo = phases
                if impl == "batched_mm":  # same memory guard as run_bench
                    todo = [p for p in phases if all("skipped" not in d for c, d in result["phases"][p.name][
                        "configs"].items() if result["configs"][c].get("experts_implementation") == impl)]
                by[impl] = measure_expert_share(model, todo, repeats=repeats, warmup=warmup,
                                                seed=s.get("seed", 0), progress=progress)
        finally:
            if old_impl is not None:
                _set_impl(model, old_impl)
            torch.set_num_threads(old)
        share = {"by_implementation": by, "default": default_impl}
        share_measured = True
    else:
        share_measured = False
    ref_name = result["reference"]
    out = {"method": ("forward pre/post hooks with time.perf_counter on every routed experts module of the "
                      "full (unpatched) model; f = experts time / step time, f_decoder = experts time / "
                      "decoder-stack time; ideal = 1 / ((1 - f) + f * A_plan / A_full) with measured A"),
           "measured": share_measured, "phases": {}}
    if "by_implementation" in share:
        out["share_by_implementation"] = share["by_implementation"]
    for phase in phases:
        ph = result["phases"][phase.name]
        rows = {}
        for c, d in ph["configs"].items():
            if "skipped" in d or "speedup" not in d:
                continue
            meta = result["configs"][c]
            sh = _share_for(share, meta.get("experts_implementation"), phase.name)
            ref = ph["configs"].get(meta.get("reference", ref_name), {})
            a_full, a_plan = ref.get("activations_per_token"), d.get("activations_per_token")
            if sh is None or not a_full or a_plan is None:
                continue
            f, fd = sh["f"], sh.get("f_decoder")
            ideal = ideal_speedup(f, a_plan, a_full)
            row = {"f": f, "activations_per_token": a_plan, "activations_full": a_full, "ideal_speedup": ideal,
                   "achieved_speedup": d["speedup"], "achieved_over_ideal": d["speedup"] / ideal}
            if d.get("speedup_of_mins"):
                row["achieved_over_ideal_of_mins"] = d["speedup_of_mins"] / ideal
            if fd is not None and d.get("decoder_speedup"):
                ideal_d = ideal_speedup(fd, a_plan, a_full)
                row.update(f_decoder=fd, ideal_decoder_speedup=ideal_d, achieved_decoder_speedup=d["decoder_speedup"],
                           decoder_achieved_over_ideal=d["decoder_speedup"] / ideal_d)
                if d.get("decoder_speedup_of_mins"):
                    row["decoder_achieved_over_ideal_of_mins"] = d["decoder_speedup_of_mins"] / ideal_d
            rows[c] = row
        sh = _share_for(share, default_impl, phase.name) or {}
        entry = {**sh, "configs": rows}
        full = ph["configs"].get(ref_name, {})
        if share_measured and "median_s" in full and "hooked_median_s" in sh:
            entry["hook_overhead_pct"] = 100.0 * (sh["hooked_median_s"] / full["median_s"] - 1.0)
        out["phases"][phase.name] = entry
    out["token_policy_overhead"] = policy_overhead(result, share)
    result["amdahl"] = out
    return out


def policy_overhead(result: dict, share: dict | None = None) -> dict:
    """Time of each token-policy plan relative to a fixed plan with the same per-layer k, per phase.

    raw: t_policy / t_fixed - 1. at_equal_activations: the fixed plan's time is first moved to the
    policy's measured activations with the Amdahl model (share f of the phase), which matters for
    policies whose measured activations differ from the plan (threshold, top-p, naee).
    """
    out = {}
    cfgs = result["configs"]
    for c, meta in cfgs.items():
        s = meta.get("summary")
        if not s or s["policy"] == "fixed":
            continue
        impl, sparse = meta.get("experts_implementation"), meta.get("sparse_path")
        fixed = [f for f, m in cfgs.items() if m.get("summary") and m["summary"]["policy"] == "fixed"
                 and m["summary"]["ks"] == s["ks"] and m.get("experts_implementation") == impl]
        fixed.sort(key=lambda f: cfgs[f].get("sparse_path") != sparse)
        if not fixed:
            continue
        fx = fixed[0]
        per_phase = {}
        for pname, ph in result["phases"].items():
            a, b = ph["configs"].get(c, {}), ph["configs"].get(fx, {})
            if "median_s" not in a or "median_s" not in b:
                continue
            row = {"fixed": fx, "raw_pct": 100.0 * (a["median_s"] / b["median_s"] - 1.0),
                   "decoder_raw_pct": 100.0 * (a["decoder_median_s"] / b["decoder_median_s"] - 1.0),
                   "raw_of_mins_pct": 100.0 * (a["min_s"] / b["min_s"] - 1.0),
                   "activations_policy": a["activations_per_token"], "activations_fixed": b["activations_per_token"]}
            ref = ph["configs"].get(meta.get("reference", result["reference"]), {})
            a_full = ref.get("activations_per_token")
            sh = _share_for(share, impl, pname) if share else None
            if sh and a_full:
                for key, fk, tk in (("at_equal_activations_pct", "f", "median_s"),
                                    ("decoder_at_equal_activations_pct", "f_decoder", "decoder_median_s"),
                                    ("of_mins_at_equal_activations_pct", "f", "min_s")):
                    f = sh.get(fk)
                    if f is None:
                        continue
                    scale = ((1 - f) + f * a["activations_per_token"] / a_full) / \
                            ((1 - f) + f * b["activations_per_token"] / a_full)
                    row[key] = 100.0 * (a[tk] / (b[tk] * scale) - 1.0)
            per_phase[pname] = row
        out[c] = per_phase
    return out


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------


def _f(x, fmt="{:.2f}"):
    return "—" if x is None else fmt.format(x)


def format_table(result: dict) -> str:
    """Markdown: one table per phase (time, spread, speed-ups, Amdahl), then the token-policy overhead."""
    env = result["env"]
    am = result.get("amdahl", {}).get("phases", {})
    lines = [f"Model `{env['model']}` ({env['architecture']}), {env['dtype']} on {env['device']} "
             f"({env['cpu']}), {env['threads']} thread(s); torch {env['torch']}, transformers "
             f"{env['transformers']}; experts implementation `{env['experts_implementation']}`, sparse path "
             f"`{env['sparse_experts_path']}`. Medians over {result['settings']['repeats']} interleaved repeats "
             f"({result['settings']['warmup']} warm-up round(s) discarded).", ""]
    for pname, ph in result["phases"].items():
        a = am.get(pname, {})
        head = f"### {pname}: {ph['description']}"
        by = result.get("amdahl", {}).get("share_by_implementation") or {}
        if len(by) > 1:
            parts = [f"{i}: {v[pname]['f']:.3f} / {v[pname]['f_decoder']:.3f}" for i, v in by.items()
                     if pname in v and v[pname].get("f_decoder") is not None]
            head += " — routed-experts share f of the step / of the decoder stack: " + "; ".join(parts)
        elif a.get("f") is not None:
            head += (f" — routed-experts share f = {a['f']:.3f} of the step"
                     + (f", {a['f_decoder']:.3f} of the decoder stack" if a.get("f_decoder") is not None else ""))
        lines += [head, ""]
        unit = "ms/step" if ph["kind"] == "decode" else "ms"
        div = ph["tokens"] if ph["kind"] == "decode" else 1
        lines.append(f"| config | policy | act/token (measured) | median {unit} | min–max {unit} | speed-up | "
                     "ideal (Amdahl) | achieved/ideal | decoder speed-up | decoder ideal | decoder achieved/ideal | "
                     "speed-up of mins (achieved/ideal) |")
        lines.append("|" + "---|" * 12)
        for c, d in ph["configs"].items():
            meta = result["configs"][c]
            pol = meta["summary"]["policy"] if meta.get("summary") else "(unpatched)"
            if "skipped" in d:
                lines.append(f"| {c} | {pol} | | {d['skipped']} | | | | | | | | |")
                continue
            r = a.get("configs", {}).get(c, {})
            lines.append(
                f"| {c} | {pol} | {_f(d['activations_per_token'])} | {1e3 * d['median_s'] / div:.1f} | "
                f"{1e3 * d['min_s'] / div:.1f}–{1e3 * d['max_s'] / div:.1f} | {_f(d.get('speedup'), '{:.3f}')} | "
                f"{_f(r.get('ideal_speedup'), '{:.3f}')} | {_f(r.get('achieved_over_ideal'), '{:.1%}')} | "
                f"{_f(d.get('decoder_speedup'), '{:.3f}')} | {_f(r.get('ideal_decoder_speedup'), '{:.3f}')} | "
                f"{_f(r.get('decoder_achieved_over_ideal'), '{:.1%}')} | {_f(d.get('speedup_of_mins'), '{:.3f}')}"
                + (f" ({r['achieved_over_ideal_of_mins']:.1%})" if r.get("achieved_over_ideal_of_mins") else "") + " |")
        lines.append("")
    ov = result.get("amdahl", {}).get("token_policy_overhead") or policy_overhead(result)
    if ov:
        lines += ["### Token-policy overhead vs the fixed plan with the same per-layer k", "",
                  "| policy plan | phase | fixed plan | act/token policy / fixed | time overhead | "
                  "at equal activations | decoder overhead | decoder at equal activations | overhead of mins |",
                  "|" + "---|" * 9]
        for c, per in ov.items():
            for pname, r in per.items():
                lines.append(
                    f"| {c} | {pname} | {r['fixed']} | {_f(r['activations_policy'])} / {_f(r['activations_fixed'])} | "
                    f"{r['raw_pct']:+.1f}% | {_f(r.get('at_equal_activations_pct'), '{:+.1f}%')} | "
                    f"{r['decoder_raw_pct']:+.1f}% | {_f(r.get('decoder_at_equal_activations_pct'), '{:+.1f}%')} | "
                    f"{r['raw_of_mins_pct']:+.1f}% |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# CLI entry
# --------------------------------------------------------------------------------------------------


def default_plans(model: nn.Module, budget: float = 0.5) -> dict:
    """A uniform fixed plan and a uniform plan with the batch-global token policy, at `budget`."""
    from .planning import allocate

    pct = f"{round(budget * 100)}%" if isinstance(budget, float) and budget < 1 else str(budget)
    return {f"uniform-{pct}-fixed": allocate(model, budget, "uniform", progress=False),
            f"uniform-{pct}-global": allocate(model, budget, "uniform", token_policy="global", progress=False)}


def bench_command(model_spec: str | None, shape: str | None, plan_paths: list[str], out: str, **opts) -> dict:
    """`allocmoe bench`: load the model (or build a shape), time full vs plans, write bench.json.

    opts: dtype ("float32"), device ("cpu"), threads, prefill_batch, prefill_len, decode_batches,
    decode_tokens, decode_prompt, repeats, warmup, seed, progress, implementations, experts_implementation,
    sparse_path, amdahl (True), markdown (path for the table), command (recorded in the JSON).
    """
    from .io import atomic_write_json, atomic_write_text
    from .models import load_model

    if model_spec and shape:
        raise AllocMoeError("pass either --model or --shape, not both")
    dtype = opts.pop("dtype", "float32")
    device = opts.pop("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise AllocMoeError("--device cuda was asked for but no CUDA device is available")
    do_amdahl = opts.pop("amdahl", True)
    markdown = opts.pop("markdown", None)
    command = opts.pop("command", " ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
    impl = opts.pop("experts_implementation", None)
    sparse = opts.pop("sparse_path", None)
    budget = opts.pop("budget", 0.5)
    threads = opts.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    if shape:
        from .shapes import build_shape
        from .models import DTYPES

        if dtype not in DTYPES or dtype == "auto":
            raise AllocMoeError(f"unknown dtype {dtype!r} (choose float32, bfloat16 or float16)")
        model = build_shape(shape, dtype=DTYPES[dtype], device=device)
    else:
        model, _, _ = load_model(model_spec, dtype=dtype, device=device)
    if impl:
        _set_impl(model, impl)
    if sparse:
        from .experts_fast import set_sparse_path

        try:
            set_sparse_path(sparse)
        except ValueError as e:
            raise AllocMoeError(str(e)) from None
    plans: dict = {}
    for p in plan_paths or []:
        name = Path(p).stem
        while name in plans or name == FULL:
            name += "'"
        plans[name] = Plan.load(p)
    if not plans:
        plans = default_plans(model, budget)
    result = run_bench(model, {FULL: None, **plans}, **opts)
    if do_amdahl:
        amdahl(model, result, threads=threads, progress=opts.get("progress", True))
    result["command"] = command
    atomic_write_json(out, result)
    if markdown:
        atomic_write_text(markdown, format_table(result) + "\n")
    return result
