"""Orchestration: time prefill and decode for the full model and plans, interleaved in one process.

    result = run_bench(model, {"half": plan, "half-global": plan2}, BenchSettings(repeats=5))
    print(format_table(result))

- runs are interleaved: each round runs every config once (full, plan A, plan B, ...; the starting
  config rotates each round), the first `warmup` rounds are discarded, and median / min / max / IQR are
  reported per config. Speed-up = reference median / plan median; `speedup_of_mins` beside it.
- activations per token: measured by the applied plan's counters over the timed runs (decode: the
  decode steps only); for the full model, from one extra untimed run with `allocmoe.full_plan`.
- Amdahl (`settings.amdahl`, on by default): the full model runs again with hooks on every routed
  experts module to measure the share f of the step in routed experts; every ratio gets its limit
  1 / ((1 - f) + f * A_plan / A_full) (without it, the bound A_full / A_plan).
- reliability: a ratio above its limit by more than `limit_tolerance`, or from repeats spread wider than
  `max_spread` (IQR / median), is flagged (see `stats`); with `remeasure` (default) a phase with a flagged
  ratio is timed once more and the second attempt kept (the first is stored under `first_attempt`); what
  is still flagged stays flagged. The load average at the start and end and the thread count are recorded.
Nothing is switched globally: counting and the sparse experts path are arguments of `allocmoe.apply`, and
the thread count and experts implementation are restored when the run ends.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .. import experts_fast
from ..adapters import find_moe_layers
from ..errors import SettingsError
from ..patching import apply
from ..plan import Plan, full_plan
from . import stats
from .environment import environment, load_average, machine_busy, set_experts_implementation
from .workloads import Phase, PhaseRunner, make_phases, measure_expert_share

BENCH_FORMAT = "allocmoe-bench"
BENCH_VERSION = 1
FULL = "full"


@dataclass
class BenchSettings:
    """Everything `run_bench` needs besides the model and the configs."""

    prefill_batch: int = 1
    prefill_len: int = 256  # 0: no prefill phase
    decode_batches: tuple[int, ...] = (1, 8)  # one decode phase per batch size
    decode_tokens: int = 32  # timed decode steps (0: no decode phase)
    decode_prompt: int = 16  # untimed prompt that fills the KV cache before decoding
    repeats: int = 5  # timed rounds (medians reported)
    warmup: int = 1  # discarded rounds
    seed: int = 0  # random token ids
    threads: int | None = None  # torch threads for the run (None: leave torch's); restored afterwards
    experts_implementation: str | None = None  # `config._experts_implementation` for the run; restored
    implementations: tuple[str, ...] | None = None  # compare these: every config runs under each ("name@impl")
    sparse_path: str | None = None  # experts_fast path for dropped slots (None: apply's default); Variant overrides
    count_experts: bool = False  # per-expert load counters during the runs (the pair counts stay on)
    batched_mm_max_bytes: int = 4 << 30  # skip batched_mm configs that would gather more weight bytes per layer
    amdahl: bool = True  # measure the routed-expert share f and give every ratio its Amdahl limit
    amdahl_repeats: int = 3
    amdahl_warmup: int = 1
    remeasure: bool = True  # time a phase with a flagged ratio once more
    limit_tolerance: float = stats.LIMIT_TOLERANCE  # flag ratios above limit * (1 + this)
    max_spread: float = stats.MAX_SPREAD  # flag ratios whose repeats spread wider (IQR / median)
    progress: bool = True

    def __post_init__(self):
        self.decode_batches = tuple(int(b) for b in (self.decode_batches or ()))
        self.implementations = tuple(self.implementations) if self.implementations else None
        if self.repeats < 1:
            raise SettingsError(f"repeats must be >= 1, got {self.repeats}", param="repeats")
        if self.warmup < 0:
            raise SettingsError(f"warmup must be >= 0, got {self.warmup}", param="warmup")
        if self.threads is not None and self.threads < 0:
            raise SettingsError(f"threads must be >= 1 (0 or None: leave torch's), got {self.threads}", param="threads")
        if any(b < 1 for b in self.decode_batches):
            raise SettingsError("decode batch sizes must be >= 1", param="decode_batches")

    def phases(self) -> list[Phase]:
        return make_phases(self.prefill_batch, self.prefill_len, self.decode_batches, self.decode_tokens,
                           self.decode_prompt)

    def record(self) -> dict:
        """The settings as stored in the result JSON (`result["settings"]`)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "progress"}
        d["decode_batches"] = list(self.decode_batches)
        d["implementations"] = list(self.implementations or [])
        d.update(interleaving="each round runs every config once, the first config rotating",
                 decode_method="manual loop model(input_ids=next, cache=cache, use_cache=True), "
                               "teacher-forced fixed random continuation",
                 decoder_time="forward pre-hook on the first decoder layer, hook on the last")
        return d


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


def _default_sparse_path(configs: list[_Config], asked: str | None) -> str | None:
    """The sparse experts path `apply` uses for plans without their own (validated as apply does)."""
    if all(c.plan is None for c in configs):
        return asked
    return experts_fast.sparse_path_or_default(asked)


@contextmanager
def _implementation(model: nn.Module, impl: str | None):
    old = getattr(model.config, "_experts_implementation", None)
    if impl is not None:
        set_experts_implementation(model, impl)
    try:
        yield
    finally:
        if impl is not None and old is not None:
            set_experts_implementation(model, old)


@contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _pairs_tokens(h) -> tuple[int, int]:
    c = h.counts()["cumulative"]
    return sum(c["pairs_per_layer"]), c["tokens"]


def _acts_since(h, before) -> tuple[int, int]:
    pairs, tokens = _pairs_tokens(h)
    return pairs - before[0], tokens - before[1]


def _prompt_impl(impl: str | None, orig: str | None) -> str | None:
    if impl != "batched_mm":
        return None
    return orig if orig and orig != "batched_mm" else "grouped_mm"


class _Bench:
    """One run_bench call: the configs, the timer and the settings."""

    def __init__(self, model: nn.Module, configs: list[_Config], s: BenchSettings, base_impl: str | None,
                 default_sparse: str | None):
        self.model, self.configs, self.s = model, configs, s
        self.base_impl, self.default_sparse = base_impl, default_sparse
        self.layers = find_moe_layers(model)
        self.runner = PhaseRunner(model, seed=s.seed)
        self.fulls = [c for c in configs if c.plan is None]

    def _apply(self, plan: Plan, c: _Config | None = None):
        return apply(self.model, plan, count_experts=self.s.count_experts,
                     sparse_path=(c.sparse if c is not None and c.sparse else self.default_sparse))

    def _skipped(self, phase: Phase) -> dict:
        skipped = {}
        for c in self.configs:
            if c.impl != "batched_mm":
                continue
            acts = sum(l.top_k for l in self.layers) if c.plan is None else max(sum(c.plan.ks),
                                                                                sum(c.plan.original_ks))
            per_call = phase.batch * (phase.tokens if phase.kind == "prefill" else 1)
            need = _batched_bytes(self.model, per_call * acts // max(1, len(self.layers)))
            limit = self.s.batched_mm_max_bytes
            if need > limit:
                skipped[c.name] = (f"not run: batched_mm would gather {need / 2**30:.1f} GiB of expert "
                                   f"weights per layer (limit {limit / 2**30:.1f} GiB)")
        return skipped

    def _measure_acts(self, phase: Phase, h, prompt_impl: str | None) -> float:
        snap = {}
        self.runner.run(phase, between=lambda s: snap.update(before=_pairs_tokens(h)), prompt_impl=prompt_impl)
        pairs, tokens = _acts_since(h, snap["before"])
        return pairs / tokens if tokens else 0.0

    def time_phase(self, phase: Phase, bar, ref_name: str) -> dict:
        """Interleaved timings of every config in one phase, summarised, with ratios (no flags yet)."""
        s, model = self.s, self.model
        rows = {c.name: {"times_s": [], "decoder_times_s": [], "activations_per_token": None, "acts": []}
                for c in self.configs}
        skipped = self._skipped(phase)
        # activations of the unpatched configs: one untimed counting run with full_plan
        for c in self.fulls:
            bar.update(1)
            if c.name in skipped:
                continue
            with _implementation(model, c.impl), self._apply(full_plan(model)) as h:
                rows[c.name]["activations_per_token"] = self._measure_acts(phase, h, _prompt_impl(c.impl,
                                                                                                  self.base_impl))
        n = len(self.configs)
        for rnd in range(s.warmup + s.repeats):
            k = rnd % n
            for c in self.configs[k:] + self.configs[:k]:
                bar.update(1)
                if c.name in skipped:
                    continue
                pimpl = _prompt_impl(c.impl, self.base_impl)
                with _implementation(model, c.impl):
                    if c.plan is None:
                        t, td = self.runner.run(phase, prompt_impl=pimpl)
                    else:
                        with self._apply(c.plan, c) as h:
                            snap = {}
                            t, td = self.runner.run(phase, between=lambda _, h=h, snap=snap: snap.update(
                                before=_pairs_tokens(h)), prompt_impl=pimpl)
                            rows[c.name]["acts"].append(_acts_since(h, snap["before"]))
                if rnd >= s.warmup:
                    rows[c.name]["times_s"].append(t)
                    rows[c.name]["decoder_times_s"].append(td)
        return _phase_result(phase, rows, skipped, self.configs, ref_name)


def _phase_result(phase: Phase, rows: dict, skipped: dict, configs: list[_Config], ref_name: str) -> dict:
    out = {"description": phase.describe(), **asdict(phase), "configs": {}}
    for c in configs:
        r = rows[c.name]
        if c.name in skipped:
            out["configs"][c.name] = {"skipped": skipped[c.name]}
            continue
        acts = r["acts"]
        if acts:
            pairs, tokens = sum(a[0] for a in acts), sum(a[1] for a in acts)
            r["activations_per_token"] = pairs / tokens if tokens else 0.0
        d = {"times_s": r["times_s"], **stats.summary(r["times_s"]),
             "decoder_times_s": r["decoder_times_s"],
             **{f"decoder_{k}": v for k, v in stats.summary(r["decoder_times_s"]).items()},
             "activations_per_token": r["activations_per_token"]}
        if phase.kind == "decode":
            d["ms_per_step"] = 1e3 * d["median_s"] / phase.tokens
        d["tokens_per_s"] = phase.batch * phase.tokens / d["median_s"]
        out["configs"][c.name] = d
    stats.add_ratios(out["configs"], {c.name: c.ref for c in configs}, ref_name)
    return out


def _first_attempt(ph: dict) -> dict:
    keep = ("times_s", "median_s", "iqr_pct", "speedup", "speedup_limit", "flags")
    return {c: {k: d[k] for k in keep if k in d} for c, d in ph["configs"].items() if "skipped" not in d}


def run_bench(model: nn.Module, configs: dict, settings: BenchSettings | None = None) -> dict:
    """Time prefill and decode for the full model and each config; see the module docstring.

    configs: {name: Plan | dict | path | None | Variant}; None means the unpatched model (if no entry is
    None, the full model is added as "full"); a `Variant` also fixes the experts implementation and/or
    the allocmoe sparse path of that config. With `settings.implementations` every config runs under each
    experts implementation, named "name@impl". Ratios of a config are taken against the unpatched model
    under the same experts implementation (its `reference`); `vs_reference_full` compares with the first
    unpatched config. batched_mm configs whose weight gather would exceed `batched_mm_max_bytes` per layer
    are skipped (reported); their decode prompt runs under the model's own implementation (untimed).
    The model is left as it was (no plan applied, same experts implementation, same thread count).
    """
    from tqdm.auto import tqdm

    s = settings or BenchSettings()
    phases = s.phases()
    cfgs, ref_name = _configs(model, configs, s.implementations)
    with _threads(s.threads), _implementation(model, s.experts_implementation):
        base_impl = getattr(model.config, "_experts_implementation", None)
        default_sparse = _default_sparse_path(cfgs, s.sparse_path)
        bench = _Bench(model, cfgs, s, base_impl, default_sparse)
        result = {
            "format": BENCH_FORMAT, "version": BENCH_VERSION,
            "env": environment(model, count_experts=s.count_experts, sparse_path=default_sparse),
            "settings": s.record(),
            "reference": ref_name,
            "configs": {c.name: {"plan": c.plan_name, "experts_implementation": c.impl or base_impl,
                                 "sparse_path": c.sparse or default_sparse, "reference": c.ref,
                                 **({"summary": _plan_summary(c.plan)} if c.plan is not None else {})}
                        for c in cfgs},
            "phases": {},
        }

        def time_phases(todo: list[Phase]) -> None:
            per_phase = (s.warmup + s.repeats) * len(cfgs) + len(bench.fulls)
            bar = tqdm(total=len(todo) * per_phase, disable=not s.progress, desc="bench", leave=False)
            try:
                with bench.runner.decoder_timer():
                    for phase in todo:
                        result["phases"][phase.name] = bench.time_phase(phase, bar, ref_name)
            finally:
                bar.close()

        time_phases(phases)
        share = _measure_share(model, result, phases, repeats=s.amdahl_repeats, warmup=s.amdahl_warmup,
                               seed=s.seed, progress=s.progress) if s.amdahl else None
        _analyse(result, share, measured=True, tolerance=s.limit_tolerance, max_spread=s.max_spread)
        redo = [p for p in phases if p.name in stats.flagged_phases(result)] if s.remeasure else []
        if redo:
            first = {p.name: _first_attempt(result["phases"][p.name]) for p in redo}
            time_phases(redo)
            for p in redo:
                result["phases"][p.name].update(remeasured=True, first_attempt=first[p.name])
            result["reliability"]["remeasured"] = [p.name for p in redo]
            _analyse(result, share, measured=True, tolerance=s.limit_tolerance, max_spread=s.max_spread)
        result["env"]["loadavg_end"] = load_average()
        result["env"]["machine_busy"] = machine_busy(result["env"])
    return result


def _analyse(result: dict, share: dict | None, *, measured: bool, tolerance: float, max_spread: float) -> None:
    """Amdahl rows (when a share is known) and the limit and flags of every ratio, in place."""
    if share is not None:
        result["amdahl"] = stats.amdahl_analysis(result, share, measured=measured)
    stats.flag_ratios(result, tolerance=tolerance, max_spread=max_spread)


def _measure_share(model: nn.Module, result: dict, phases: list[Phase], *, repeats: int, warmup: int, seed: int,
                   progress: bool) -> dict:
    """The routed-expert share of every phase, once per experts implementation of the unpatched configs."""
    default_impl = result["env"].get("experts_implementation")
    impls = []
    for meta in result["configs"].values():
        i = meta.get("experts_implementation")
        if meta.get("summary") is None and i not in impls:
            impls.append(i)
    by = {}
    for impl in impls:
        todo = phases
        if impl == "batched_mm":  # same memory guard as the timed runs
            todo = [p for p in phases if all("skipped" not in d for c, d in result["phases"][p.name][
                "configs"].items() if result["configs"][c].get("experts_implementation") == impl)]
        with _implementation(model, impl):
            by[impl] = measure_expert_share(model, todo, repeats=repeats, warmup=warmup, seed=seed,
                                            progress=progress)
    return {"by_implementation": by, "default": default_impl}


def amdahl(model: nn.Module | None, result: dict, *, share: dict | None = None, repeats: int = 3,
           warmup: int = 1, threads: int | None = None, progress: bool = True,
           tolerance: float = stats.LIMIT_TOLERANCE, max_spread: float = stats.MAX_SPREAD) -> dict:
    """Ideal (Amdahl) vs achieved speed-up of every plan in `result`, per phase; stored in result["amdahl"].

    For a result of `run_bench(..., BenchSettings(amdahl=False))`, or to redo the analysis with a known
    share: `share` ({phase: {"f": .., "f_decoder": ..}}) skips the measurement (tests, or a share measured
    elsewhere); otherwise it is measured on `model` (full, unpatched) with the phases of `result`, once
    per experts implementation that `result` compares (f depends on the kernels). The limits and flags of
    every ratio are updated too (`stats.flag_ratios`).
    """
    st = result["settings"]
    phases = make_phases(st["prefill_batch"], st["prefill_len"], st["decode_batches"], st["decode_tokens"],
                         st["decode_prompt"])
    phases = [p for p in phases if p.name in result["phases"]]
    measured = share is None
    if share is None:
        if model is None:
            raise SettingsError("amdahl needs the model to measure the experts' share of the time", param="model")
        with _threads(threads or result["env"].get("threads")):
            share = _measure_share(model, result, phases, repeats=repeats, warmup=warmup,
                                   seed=st.get("seed", 0), progress=progress)
    _analyse(result, share, measured=measured, tolerance=tolerance, max_spread=max_spread)
    return result["amdahl"]


# --------------------------------------------------------------------------------------------------
# configs for the command line and scripts
# --------------------------------------------------------------------------------------------------


def default_plans(model: nn.Module, budget: float = 0.5) -> dict:
    """A uniform fixed plan and a uniform plan with the batch-global token policy, at `budget`."""
    import allocmoe

    pct = f"{round(budget * 100)}%" if isinstance(budget, float) and budget < 1 else str(budget)
    return {f"uniform-{pct}-fixed": allocmoe.allocate(model, budget, "uniform", progress=False),
            f"uniform-{pct}-global": allocmoe.allocate(model, budget, "uniform", token_policy="global",
                                                       progress=False)}


def load_plans(paths) -> dict:
    """{name: Plan} from plan JSON paths, named by file stem ("'" appended to repeats and to "full")."""
    plans: dict = {}
    for p in paths or []:
        name = Path(p).stem
        while name in plans or name == FULL:
            name += "'"
        plans[name] = Plan.load(p)
    return plans
