"""The main job: profile -> allocate every method at several budgets -> evaluate -> benchmark -> report.

    allocmoe run --out runs/demo                       # built-in model, budgets 0.25, 0.5, 0.75

Every configuration is evaluated with the plan applied, and its activations per token are the counts
the patched model executed during the validation pass (never the plan's arithmetic).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console

from ._version import __version__
from .adapters import find_moe_layers
from .data import read_texts, token_windows
from .errors import SettingsError
from .evaluation import above_chance, evaluate, load_task, shipped_tasks
from .io import atomic_write_json, prepare_output_dir
from .methods import METHODS
from .models import load_model, local_path
from .plan import Plan, model_description
from .planning import add_compensation, allocate
from .recipe import Recipe
from .policies import TOKEN_POLICIES
from .profiling import profile as run_profile
from .report import sensitivity_heatmap, write_report

console = Console(stderr=True)

@dataclass(frozen=True)
class RunConfig:
    """One configuration of the main job: how its plan is made."""

    label: str
    method: str
    policy: str
    compensate: bool = False  # fit dropped-expert compensation on the calibration text
    profile_policy: str = "fixed"  # the profile dp/greedy/search read: fixed-policy or policy-aware
    ablation: bool = False  # made only at the ablation budget (the one nearest 0.5)


def run_configs(ablation: bool = True, policy_aware: bool = False) -> list[RunConfig]:
    """Every configuration the main job compares. From the registries: each method with `in_run` under the
    fixed policy, then each token policy with `run_with` on that method (a policy on a baseline method is
    named by the policy, "top-p"; on Alloc-L by both, "Alloc-L + Alloc-T (dp+global)"). Then the best
    combination with compensation at every budget, and the ablation at the budget nearest 0.5: each lever
    (Alloc-L, Alloc-T, compensation, end-to-end search) alone and combined. `policy_aware` adds
    policy-aware profiling to the ablation; it is off by default because its second profile costs as much as
    the first (a third of the main job on the built-in model) and it has not beaten the fixed-policy
    profile (docs/results.md)."""
    configs = [RunConfig(m.label, name, "fixed") for name, m in METHODS.items() if m.in_run]
    for pname, pol in TOKEN_POLICIES.items():
        if pol.run_with is None:
            continue
        meth = METHODS[pol.run_with]
        if meth.needs_profile:
            configs.append(RunConfig(f"{meth.label.split(' (')[0]} + {pol.label} ({meth.name}+{pname})",
                                     meth.name, pname))
        else:
            configs.append(RunConfig(pname, meth.name, pname))
    configs.append(RunConfig(COMPENSATED, "dp", "global", compensate=True))
    if ablation:
        configs += [
            RunConfig("compensation alone (uniform+comp)", "uniform", "fixed", compensate=True, ablation=True),
            RunConfig("Alloc-T alone (uniform+global)", "uniform", "global", ablation=True),
            RunConfig("search + Alloc-T (search+global)", "search", "global", ablation=True),
            RunConfig("search + Alloc-T + comp (search+global+comp)", "search", "global", compensate=True,
                      ablation=True),
        ]
        if policy_aware:
            configs.append(RunConfig("policy-aware Alloc-L + Alloc-T (dp-pa+global)", "dp", "global",
                                     profile_policy="global", ablation=True))
    return configs


COMPENSATED = "Alloc-L + Alloc-T + comp (dp+global+comp)"


def plan_file_stem(label: str, budget: float) -> str:
    return f"{budget}_{label.split(' (')[-1].rstrip(')').replace('+', '_').replace(' ', '_')}"


def ablation_budget(budgets: list[float]) -> float:
    return sorted(budgets, key=lambda b: abs(b - 0.5))[0]


# the configurations whose speed the main job measures
SPEED_LABELS = ("uniform", "Alloc-L (dp)", "Alloc-L + Alloc-T (dp+global)", "Alloc-L + threshold (dp+threshold)",
                COMPENSATED)


@dataclass
class RunSettings:
    budgets: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    metric: str = "kl"
    renormalize: str = "native"
    # token counts sized so the default job fits in 10 minutes on 2 CPU cores with either 12-MoE-layer built-in
    # model: on 8,192 calibration tokens the three operating-point profiles alone took 822 s of the top-8 model's
    # job (1 thread, busy machine); on 4,096 each model's whole job takes 6:18 on 2 quiet cores (docs/results.md).
    # Every configuration is scored on the same tokens, so comparisons are paired
    calibration_tokens: int = 4096
    policy_calibration_tokens: int = 4096
    eval_tokens: int = 8192
    seq_len: int = 256
    batch_size: int = 8
    task_examples: int | None = None
    tasks: list[str] | None = None  # task JSON paths; None = the shipped tasks
    data: list[str] | None = None  # validation text files; None = the built-in validation split
    calibration_data: list[str] | None = None
    # out-of-domain text (a style the calibration text does not have); None = the built-in ood split,
    # [] = skip. A plan that only fits the calibration text is not a better plan.
    ood_data: list[str] | None = None
    ood_tokens: int = 8192
    speed: bool = True
    ablation: bool = True  # the lever-by-lever table at the budget nearest 0.5 (adds two plan searches)
    policy_aware: bool = False  # add policy-aware profiling to the ablation (a second profile)
    # where Alloc-L's profile is measured: "budget" = one profile per budget at its operating point (every other
    # layer at the budget's allocation; issue 19: measured at full K, the DP lost to uniform), "full" = one
    # profile with every other layer at full K (the paper's protocol)
    profile_at: str = "budget"

    def __post_init__(self):  # checked when the settings are made, before any model is loaded
        if self.profile_at not in ("budget", "full"):
            raise SettingsError(f"profile_at must be 'budget' or 'full', got {self.profile_at!r}", param="profile_at")
    seed: int = 0
    threads: int | None = None


def prepare_out_dir(out: Path, force: bool) -> None:
    prepare_output_dir(out, force)
    (out / "plans").mkdir(parents=True, exist_ok=True)


def config_recipe(c: RunConfig, budget: float, s: RunSettings, calibration_tokens: int) -> Recipe:
    """How the main job makes configuration `c`'s plan at `budget`: its method and token policy, the run's
    renormalisation and seed, and the first `calibration_tokens` of the calibration text."""
    return Recipe.from_keywords(budget=budget, method=c.method, token_policy=c.policy, renormalize=s.renormalize,
                                seed=s.seed, compensate=c.compensate, calibration_tokens=calibration_tokens,
                                seq_len=s.seq_len, calibration_files=s.calibration_data)


def evaluate_config(model, tok, plan: Plan | None, texts, tasks: list[dict], s: RunSettings) -> dict:
    """`allocmoe.evaluate` with the run's settings."""
    return evaluate(model, plan, tokenizer=tok, texts=texts, tasks=tasks, seq_len=s.seq_len,
                    batch_size=s.batch_size, max_tokens=s.eval_tokens, max_examples=s.task_examples)


def execution_key(plan: Plan) -> str:
    """What a plan computes: per-layer k, token policy, renormalisation and the compensation's maps (not the
    method, recipe or notes). Equal keys give equal outputs on the same model."""
    comp = plan.compensation_maps
    return json.dumps({"ks": plan.ks, "token_policy": plan.token_policy, "renormalize": plan.renormalize,
                       "compensation": None if comp is None else comp.weights_digest()}, sort_keys=True)


def run(model_spec: str | None, out: Path, settings: RunSettings | None = None, force: bool = False,
        dtype: str = "float32", load_kwargs: dict | None = None) -> dict:
    """The main job. `load_kwargs` go to `load_model` (device_map / max_memory / offload_dir)."""
    s = settings or RunSettings()
    out = Path(out)
    prepare_out_dir(out, force)
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    t_start = time.perf_counter()
    model, tok, path = load_model(model_spec, dtype, **(load_kwargs or {}))
    layers = find_moe_layers(model)
    tasks = [load_task(p) for p in (s.tasks if s.tasks is not None else shipped_tasks())]
    val_texts, val_names = read_texts(s.data, "validation")
    ood_texts, ood_names = read_texts(s.ood_data, "ood") if s.ood_data != [] else ([], [])
    cal_texts, cal_names = read_texts(s.calibration_data, "calibration")
    cal = token_windows(tok, cal_texts, s.seq_len, s.calibration_tokens, name=cal_names[0])
    pol_cal = cal[: max(1, s.policy_calibration_tokens // s.seq_len)]

    mid = ablation_budget(s.budgets)
    at_budget = s.profile_at == "budget"
    console.print(f"[bold]1/4 profiling[/bold] {len(layers)} MoE layers on {cal.numel():,} tokens"
                  + (f", at each budget's operating point ({', '.join(map(str, s.budgets))})" if at_budget else
                     ", every other layer at full K"))
    t0 = time.perf_counter()
    fixed_profiles: dict[float, Path] = {}  # budget -> the profile its Alloc-L plans are made from
    prof = None
    for b in (s.budgets if at_budget else [None]):
        name = f"profile_at_{b}.json" if at_budget else "profile.json"
        p = run_profile(model, cal, metric=s.metric, batch_size=s.batch_size, renormalize=s.renormalize,
                        out=out / name, data_info={"files": cal_names}, at=b)
        for bb in ([b] if at_budget else s.budgets):
            fixed_profiles[bb] = out / name
        if prof is None or b == mid:
            prof = p  # the report's sensitivity table: the profile at the budget nearest 0.5
    profile_seconds = time.perf_counter() - t0

    configs_to_run = run_configs(ablation=s.ablation, policy_aware=s.policy_aware)
    profile_seconds_pa = None
    profile_files = {}
    for pp in sorted({c.profile_policy for c in configs_to_run} - {"fixed"}):
        console.print(f"  policy-aware profile ({pp}) for the ablation")
        t0 = time.perf_counter()
        run_profile(model, cal, metric=s.metric, batch_size=s.batch_size, renormalize=s.renormalize,
                                   out=out / f"profile_{pp}.json", data_info={"files": cal_names},
                                   token_policy=pp, progress=False)
        profile_files[pp] = out / f"profile_{pp}.json"
        profile_seconds_pa = round(time.perf_counter() - t0, 2)
    console.print("[bold]2/4 allocating[/bold] " + ", ".join(c.label for c in configs_to_run)
                  + f" at budgets {s.budgets}")
    plans: list[tuple[str, str, float, Plan]] = []
    t_alloc = {}
    made: dict[tuple, Plan] = {}  # a compensated configuration reuses its uncompensated plan (same allocation)
    for b in s.budgets:
        for c in configs_to_run:
            if c.ablation and b != mid:
                continue
            t0 = time.perf_counter()
            key = (b, c.method, c.policy, c.profile_policy)
            if key not in made:
                # the plan's recipe names the profile file, so the plan can be re-made from it
                prof_file = fixed_profiles[b] if c.profile_policy == "fixed" else profile_files[c.profile_policy]
                made[key] = allocate(model, config_recipe(replace(c, compensate=False), b, s, pol_cal.numel()),
                                     profile=prof_file, tokenizer=tok, progress=False)
            plan = add_compensation(model, made[key], tokenizer=tok, progress=False) if c.compensate else made[key]
            t_alloc[f"{b}/{c.label}"] = round(time.perf_counter() - t0, 2)
            plan.save(out / "plans" / f"{plan_file_stem(c.label, b)}.json")
            plans.append((c.label, c.method, b, plan))

    console.print(f"[bold]3/4 evaluating[/bold] {len(plans) + 1} configurations on "
                  f"{min(s.eval_tokens, 10**9):,} validation tokens + {len(tasks)} tasks")
    from tqdm.auto import tqdm

    def ood(plan):
        if not ood_texts:
            return {}
        r = evaluate(model, plan, tokenizer=tok, texts=ood_texts, seq_len=s.seq_len, batch_size=s.batch_size,
                     max_tokens=s.ood_tokens)
        return {"ood": {k: r[k] for k in ("perplexity", "tokens", "activations_per_token", "compensation",
                                          "window_nll", "window_tokens") if k in r}}

    configs = []
    full_res = evaluate_config(model, tok, None, val_texts, tasks, s)
    # a task the full model scores at chance cannot show what a budget costs: scored once, then left out
    at_chance = sorted(t for t, v in full_res.get("tasks", {}).items() if not above_chance(v))
    if at_chance:
        console.print(f"  tasks at chance for the full model, not scored for the other configurations: "
                      f"{', '.join(at_chance)}")
        tasks = [t for t in tasks if t["name"] not in at_chance]
    configs.append(dict(label="full model", method="full", policy="fixed", budget=1.0,
                        ks=[l.top_k for l in layers], **full_res, **ood(None)))
    # plans that execute the same computation (the guard often returns uniform's allocation) are evaluated once:
    # evaluation is deterministic, so the copy is what a second evaluation would measure
    done: dict[str, tuple[dict, dict]] = {}
    for label, method, b, plan in tqdm(plans, desc="evaluating", unit="cfg"):
        key = execution_key(plan)
        if key not in done:
            done[key] = (evaluate_config(model, tok, plan, val_texts, tasks, s), ood(plan))
        r, o = done[key]
        configs.append(dict(label=label, method=method, policy=plan.policy, budget=b, ks=plan.ks,
                            plan_budget=plan.budget, token_policy=plan.token_policy,
                            compensated=plan.compensation is not None,
                            profile_policy=(plan.meta.get("profile_token_policy") or "fixed"),
                            guard=(plan.meta.get("guard") or {}).get("chosen"), **r, **o))
    console.print(f"  {len(done)} distinct computations among {len(plans)} plans")

    speed_note = None
    if s.speed:
        console.print("[bold]4/4 benchmarking[/bold] prefill/decode, full vs main configurations")
        speed_note = _speed(model, plans, configs, s)

    results = {
        "allocmoe_version": __version__,
        "model": {"path": local_path(model_spec), **model_description(model, layers)},
        "settings": dict(vars(s), validation_files=val_names, calibration_files=cal_names, ood_files=ood_names,
                         profile_seconds=profile_seconds, allocate_seconds=t_alloc, ablation_budget=mid,
                         tasks_at_chance=at_chance,
                         policy_aware_profile_seconds=profile_seconds_pa,
                         threads=torch.get_num_threads(),
                         torch=torch.__version__, python=platform.python_version()),
        "profile": {"k_values": prof.k_values, "sensitivity": prof.sensitivity, "metric": prof.metric,
                    "metrics": prof.metrics, "tokens": prof.tokens,
                    "operating_point": prof.operating_point or {"at": "full"},
                    "files": {str(b): f.name for b, f in fixed_profiles.items()}},
        "configs": configs,
        "speed_note": speed_note,
        "wall_seconds": time.perf_counter() - t_start,
    }
    atomic_write_json(out / "results.json", results)
    write_report(results, out)
    dp_plans = {f"dp @ {b}": p.ks for label, m, b, p in plans if label == "Alloc-L (dp)"}
    sensitivity_heatmap(results["profile"], out / "allocation.png", dp_plans,
                        title="Sensitivity (log10) and Alloc-L's per-layer k at each budget")
    console.print(f"wrote {out}/results.json, report.md, frontier.png, allocation.png "
                  f"({results['wall_seconds']:.0f} s)")
    return results


def _speed(model, plans, configs, s: RunSettings) -> str:
    """Prefill/decode speed-ups of the main configurations at the budget nearest 0.5, measured side by side.

    Each config's "speed" gets its ratios, their Amdahl limits, reliability flags (a ratio above its limit,
    or from widely spread repeats, after one re-measurement) and the threads and load average of the run.
    """
    from .bench import FULL, BenchSettings, machine_busy, run_bench

    mid = ablation_budget(s.budgets)
    chosen = {label: plan for label, m, b, plan in plans if b == mid and label in SPEED_LABELS}
    settings = BenchSettings(prefill_batch=1, prefill_len=s.seq_len, decode_batches=(1,), decode_tokens=16,
                             repeats=3, warmup=1, threads=s.threads, progress=False)
    res = run_bench(model, {FULL: None, **chosen}, settings)
    env, rel = res["env"], res["reliability"]
    phases = {"prefill": res["phases"]["prefill"], "decode": res["phases"]["decode_b1"]}
    for c in configs:
        if c["budget"] == mid and c["label"] in chosen:
            sp = {}
            for key, ph in phases.items():
                d = ph["configs"][c["label"]]
                sp.update({f"{key}_speedup": d.get("speedup"), f"{key}_limit": d.get("speedup_limit"),
                           f"{key}_flags": d.get("flags", []), f"{key}_iqr_pct": d.get("iqr_pct")})
            sp.update(limit_source=phases["prefill"]["configs"][c["label"]].get("limit_source"),
                      threads=env["threads"], loadavg_start=env.get("loadavg_start"),
                      loadavg_end=env.get("loadavg_end"), remeasured=list(rel.get("remeasured", [])))
            c["speed"] = sp
    am = (res.get("amdahl") or {}).get("phases", {})
    share = ""
    if am.get("prefill", {}).get("f") is not None and am.get("decode_b1", {}).get("f") is not None:
        share = (f" (routed experts are {am['prefill']['f']:.0%} of a prefill step and {am['decode_b1']['f']:.0%} "
                 "of a decode step here)")
    load = lambda l: f"{l[0]:.2f}" if l else "?"  # noqa: E731
    n_flagged = sum(len(v) for v in rel["flagged"].values())
    return (f"Speed-ups at budget {mid} vs the full model, measured side by side in this run with "
            f"`allocmoe.bench.run_bench` ({env['threads']} thread(s); load average (1 min) "
            f"{load(env.get('loadavg_start'))} at the start, {load(env.get('loadavg_end'))} at the end, on "
            f"{env.get('cpu_count')} logical CPUs; "
            f"prefill 1x{s.seq_len}, decode batch 1 x 16 tokens, interleaved, medians of 3). Each ratio is shown "
            f"beside its Amdahl limit (≤){share}; ⚠ marks a ratio more than {rel['tolerance']:.0%} above its limit "
            f"or from repeats spread wider than {rel['max_spread']:.0%} (IQR/median), still so after re-measuring "
            f"once: do not trust it ({n_flagged} of {2 * len(chosen)} flagged)."
            + (" The load average shows other processes competing for the CPU during the measurement."
               if machine_busy(env) else "")
            + " A small model on CPU is dominated by non-expert work; for a careful benchmark use `allocmoe bench`.")
