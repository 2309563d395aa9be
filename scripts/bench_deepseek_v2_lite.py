#!/usr/bin/env python
"""The prepared speed benchmark on the DeepSeek-V2-Lite shape (random weights, real dimensions).

    .venv/bin/python scripts/bench_deepseek_v2_lite.py                  # CPU, 1 thread, fp32
    .venv/bin/python scripts/bench_deepseek_v2_lite.py --device cuda --dtype bfloat16 --threads 0

Builds `deepseek-v2-lite:LAYERS` (allocmoe.shapes), makes four plans at 50% of the original activation
budget — uniform fixed (k=3 in every MoE layer), an uneven fixed plan with the same total (2,4,2,4,...),
uniform + the batch-global token policy, uniform + the threshold policy (calibrated with
allocmoe.planning.allocate on random-token windows) — and measures, interleaved in this one process:

1. main: full model vs the four plans, prefill and decode (allocmoe.bench.run_bench with a
   BenchSettings), with the Amdahl limit beside every ratio and unreliable ratios flagged (re-measured once);
2. experts implementations: full / uniform fixed / uniform global under grouped_mm, eager, batched_mm and
   allocmoe (allocmoe.experts_fast's kernels registered as a transformers experts implementation);
3. allocmoe's sparse experts paths for the global plan (grouped, loop, auto, reference).

Writes docs/bench_deepseek_v2_lite.json (atomic) and docs/benchmarks.md (tables, the command, threads, versions). Every figure
in them is computed from this run. Nothing here needs a GPU; --device cuda uses one if present.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import allocmoe  # noqa: E402
from allocmoe import bench  # noqa: E402
from allocmoe.io import atomic_write_json, atomic_write_text  # noqa: E402
from allocmoe.planning import allocate  # noqa: E402
from allocmoe.shapes import build_shape  # noqa: E402

IMPLEMENTATIONS = ["grouped_mm", "eager", "batched_mm", "allocmoe"]  # allocmoe: experts_fast kernels, registered
SPARSE_PATHS = ("grouped", "loop", "auto", "reference")
PAPER = "the paper reports 1.15x prefill and 1.34x decode on DeepSeek-V2-Lite at half budget (GPU)"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the shape (default 4: 1 dense + 3 MoE)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = leave torch's default)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prefill-batch", type=int, default=1)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--decode-batches", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--decode-prompt", type=int, default=16)
    ap.add_argument("--calib-windows", type=int, default=4, help="random-token windows to calibrate the threshold")
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--compare-repeats", type=int, default=3, help="repeats of the implementation comparisons")
    ap.add_argument("--compare-decode-tokens", type=int, default=16, help="decode steps in the comparisons")
    ap.add_argument("--batched-mm-max-gib", type=float, default=0.5,
                    help="skip batched_mm configs whose per-layer weight gather exceeds this (GiB)")
    ap.add_argument("--no-compare", action="store_true", help="skip the implementation / sparse-path comparisons")
    ap.add_argument("--compile", action="store_true", help="also try torch.compile on the full model (report only)")
    ap.add_argument("--no-remeasure", action="store_true",
                    help="do not time a phase again when a ratio is above its limit or its repeats spread widely")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a tiny model instead of the shape (checks the script)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_deepseek_v2_lite.json"))
    ap.add_argument("--render-only", action="store_true", help="only rewrite --md from an existing --out")
    ap.add_argument("--also", nargs="*", default=[], help="result JSONs of other runs (e.g. bfloat16) to append")
    ap.add_argument("--md", default=str(ROOT / "docs" / "benchmarks.md"))
    return ap.parse_args(argv)


def uneven_ks(n: int, k: int = 3) -> list[int]:
    """k-1, k+1, k-1, ... (k for an odd last layer): the same total as k everywhere (2,4,2,... for k=3)."""
    return [k - 1, k + 1] * (n // 2) + [k] * (n % 2)


def make_plans(model, args) -> dict:
    layers = allocmoe.find_moe_layers(model)
    L = len(layers)
    uniform = allocate(model, 0.5, "uniform", progress=False)
    k = layers[0].top_k // 2
    assert uniform.ks == [k] * L, uniform.ks
    g = torch.Generator().manual_seed(args.seed + 100)
    windows = torch.randint(3, model.config.vocab_size - 1, (args.calib_windows, args.calib_len), generator=g)
    windows = windows.to(next(model.parameters()).device)
    t = time.perf_counter()
    threshold = allocate(model, 0.5, "uniform", token_policy="threshold", model=model, windows=windows, progress=True)
    print(f"threshold policy calibrated in {time.perf_counter() - t:.0f} s: "
          f"{threshold.meta['calibration']['measured_activations_per_token']:.3f} activations/token on "
          f"{windows.numel()} random tokens", flush=True)
    return {
        "uniform-fixed": uniform,
        "uneven-fixed": allocmoe.make_plan(model, uneven_ks(L, k), method="manual", meta={"note": "k-1, k+1, ..."}),
        "uniform-global": allocate(model, 0.5, "uniform", token_policy="global", progress=False),
        "uniform-threshold": threshold,
    }


def ms(result: dict, phase: str, name: str) -> str:
    """Median in ms (per step for decode)."""
    ph = result["phases"][phase]
    d = ph["configs"][name]
    if "median_s" not in d:
        return "skipped"
    per = ph["tokens"] if ph["kind"] == "decode" else 1
    return f"{d['median_s'] * 1e3 / per:.1f} ms" + ("/step" if per > 1 else "")


def fastest(result: dict, phase: str, names: list[str]) -> tuple[str, float] | None:
    cfg = result["phases"][phase]["configs"]
    cands = [(n, cfg[n]["median_s"]) for n in names if n in cfg and "median_s" in cfg[n]]
    return min(cands, key=lambda x: x[1]) if cands else None


def summary_lines(main: dict, impls: dict | None, sparse: dict | None) -> list[str]:
    am = main["amdahl"]
    out = ["## Summary (computed from this run)", ""]
    for pname, ph in main["phases"].items():
        a = am["phases"][pname]
        out.append(f"- **{pname}** (routed experts are {a['f']:.1%} of the step, {a['f_decoder']:.1%} of the decoder "
                   f"stack):")
        for c, r in a["configs"].items():
            if c == main["reference"]:
                continue
            flags = main["phases"][pname]["configs"][c].get("flags")
            out.append(f"  - {c}: {r['activations_per_token']:.2f}/{r['activations_full']:.0f} act/token; speed-up "
                       f"{r['achieved_speedup']:.3f}x{' ' + bench.MARK if flags else ''} of an ideal "
                       f"{r['ideal_speedup']:.3f}x "
                       f"(**{r['achieved_over_ideal']:.1%}** of the Amdahl limit; "
                       f"{r.get('achieved_over_ideal_of_mins', float('nan')):.1%} on the fastest runs); decoder stack "
                       f"{r['achieved_decoder_speedup']:.3f}x of {r['ideal_decoder_speedup']:.3f}x "
                       f"(**{r['decoder_achieved_over_ideal']:.1%}**)")
    ov = am.get("token_policy_overhead") or {}
    if ov:
        out += ["", "- **token-policy overhead** (policy time / fixed time at equal activations − 1, whole step, "
                "medians; decoder stack in brackets; fastest runs after the slash):"]
        for c, per in ov.items():
            parts = [f"{p} {r.get('at_equal_activations_pct', r['raw_pct']):+.1f}% "
                     f"({r.get('decoder_at_equal_activations_pct', r['decoder_raw_pct']):+.1f}%) / "
                     f"{r.get('of_mins_at_equal_activations_pct', r['raw_of_mins_pct']):+.1f}%" for p, r in per.items()]
            out.append(f"  - {c} vs {next(iter(per.values()))['fixed']}: " + ", ".join(parts))
    if impls:
        out += ["", "- **fastest experts implementation per phase** (median, same run):"]
        for pname in impls["phases"]:
            for label, prefix in (("full model", "full@"), ("uniform fixed 50%", "uniform-fixed@"),
                                  ("uniform global 50%", "uniform-global@")):
                names = [c for c in impls["configs"] if c.startswith(prefix)]
                best = fastest(impls, pname, names)
                if best:
                    others = ", ".join(f"{n.split('@')[1]} {ms(impls, pname, n)}" for n in names)
                    out.append(f"  - {pname}, {label}: **{best[0].split('@')[1]}** ({others})")
    if sparse:
        out += ["", "- **allocmoe sparse experts path** for the global plan (median, same run):"]
        for pname, ph in sparse["phases"].items():
            names = [c for c in sparse["configs"] if c.startswith("uniform-global@")]
            parts = [f"{n.split('@')[1]} {ms(sparse, pname, n)}" for n in names]
            best = fastest(sparse, pname, names)
            out.append(f"  - {pname}: " + ", ".join(parts) + (f" → **{best[0].split('@')[1]}**" if best else ""))
    out += ["", f"For comparison, {PAPER}; the figures above are CPU measurements of a random-weight model with "
            "the real dimensions but only the first layers (see the notes).", ""]
    return out


NOTES = """## Notes on the method

- Shape: `allocmoe.shapes.build_shape("deepseek-v2-lite:{layers}")` — DeepseekV2ForCausalLM with the real
  DeepSeek-V2-Lite dimensions (hidden 2048, 64 routed experts of intermediate 1408, 2 shared experts, top-6,
  first layer dense with intermediate 10944, MLA with kv_lora_rank 512, 16 heads, vocabulary 102400) but only
  {layers} decoder layers (the real model has 27), random weights, sharpened routers. With so few layers the
  LM head and the dense first layer weigh much more in a step than in the real model, so the whole-step
  speed-ups understate what the real model would get; the *decoder stack* columns (time inside the decoder
  layers only, via a pre-hook on the first and a hook on the last decoder layer) and their Amdahl limits are
  the per-layer picture.
- Prefill: one forward over the prompt batch with the KV cache on and `logits_to_keep=1`, like `generate`.
- Decode: manual loop `model(input_ids=next, cache=cache, use_cache=True)` after an untimed prompt, teacher-
  forced with a fixed random continuation so every config does the same work; time per step.
- Interleaving: every round runs every config once (the first config rotates), warm-up rounds discarded;
  median, min and max per config; speed-up = full median / plan median.
- Activations per token are measured by allocmoe's counters on the timed runs (the full model's with
  `allocmoe.full_plan` in one extra untimed run).
- Amdahl: f = time inside the routed `experts` modules (forward pre/post hooks, `time.perf_counter`) / step
  time of the full model; ideal = 1 / ((1 − f) + f · A_plan / A_full). The hooks' cost is reported
  (`hook_overhead_pct` in the JSON). The ideal assumes expert time proportional to activations. In decode each
  active expert gets one or a few rows per step and its cost is reading its weights, so time follows the number
  of active experts. In prefill every expert is active at both budgets and gets tens of rows; a CPU matmul with
  half the rows costs more than half (the weights are still streamed once and small-row GEMMs run below peak),
  so the experts' time falls by less than the activations — this is where prefill stays below the limit.
  With a longer prompt each expert gets more rows, the matmuls become compute-bound and the gap closes (the
  separate 1 x 2048 prefill run, where present, measures this).
- Token-policy overhead: the policy plan's median over the fixed plan's with the same per-layer k; "at equal
  activations" first moves the fixed time to the policy's measured activations with the same Amdahl model
  (the threshold policy's measured activations differ from its calibration target).
- batched_mm gathers one copy of the expert weights per (token, expert) pair; configs where that exceeds
  {batched_gib} GiB per layer are reported as not run, and its decode prompt (untimed) runs under grouped_mm.
"""


def try_compile(model, args) -> dict:
    """torch.compile the full model and time decode steps; reported, never depended on."""
    out = {"attempted": True}
    try:
        t = time.perf_counter()
        compiled = torch.compile(model, dynamic=True)
        r = bench.run_bench(compiled, {"full": None}, bench.BenchSettings(
            prefill_batch=args.prefill_batch, prefill_len=args.prefill_len, decode_batches=(1,), decode_tokens=8,
            decode_prompt=args.decode_prompt, repeats=2, warmup=1, amdahl=False, progress=False))
        out.update(seconds=time.perf_counter() - t,
                   prefill_median_s=r["phases"]["prefill"]["configs"]["full"]["median_s"],
                   decode_b1_ms_per_step=r["phases"]["decode_b1"]["configs"]["full"]["ms_per_step"])
    except Exception as e:  # compile support varies: report it
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    command = " ".join([".venv/bin/python", "scripts/bench_deepseek_v2_lite.py"] + (argv if argv is not None
                                                                                   else sys.argv[1:]))
    if args.render_only:
        from allocmoe.io import load_json

        atomic_write_text(args.md, render_markdown(load_json(args.out, "benchmark result"), args.out, args.also))
        print(f"wrote {args.md} from {args.out}")
        return 0
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    t0 = time.perf_counter()
    load0 = bench.load_average()
    if args.smoke:
        from allocmoe.testing import tiny_model

        model = tiny_model("deepseek_v2", num_layers=args.layers, num_experts=16, top_k=6).to(args.device, dtype)
    else:
        model = build_shape(f"deepseek-v2-lite:{args.layers}", seed=args.seed, dtype=dtype, device=args.device)
    print(f"built deepseek-v2-lite:{args.layers} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
          f"{args.dtype}) in {time.perf_counter() - t0:.0f} s; threads={torch.get_num_threads()}", flush=True)
    plans = make_plans(model, args)
    common = bench.BenchSettings(prefill_batch=args.prefill_batch, prefill_len=args.prefill_len,
                                 decode_batches=tuple(args.decode_batches), decode_tokens=args.decode_tokens,
                                 decode_prompt=args.decode_prompt, repeats=args.repeats, warmup=args.warmup,
                                 seed=args.seed, remeasure=not args.no_remeasure)

    result = {"command": command, "script_args": vars(args), "main": None, "implementations": None,
              "sparse_paths": None, "compile": {"attempted": False},
              "plans": {n: p.to_dict() for n, p in plans.items()}, "loadavg_start": load0}

    def save(stage: str) -> None:  # after every stage, so a killed run leaves what it measured
        result.update(wall_s=time.perf_counter() - t0, loadavg_end=bench.load_average(), complete=(stage == "done"))
        atomic_write_json(args.out, result)
        atomic_write_text(args.md, render_markdown(result, args.out, args.also))

    t = time.perf_counter()
    main_r = bench.run_bench(model, {"full": None, **plans}, dataclasses.replace(common, amdahl_repeats=3))
    result["main"] = main_r
    save("main")
    print(f"main benchmark: {time.perf_counter() - t:.0f} s", flush=True)
    print(bench.format_table(main_r), flush=True)

    impls = sparse = None
    guard = int(args.batched_mm_max_gib * 2**30)
    cmp = dataclasses.replace(common, decode_tokens=args.compare_decode_tokens, repeats=args.compare_repeats,
                              batched_mm_max_bytes=guard)
    if not args.no_compare:
        t = time.perf_counter()
        impls = bench.run_bench(model, {"full": None, "uniform-fixed": plans["uniform-fixed"],
                                        "uniform-global": plans["uniform-global"]},
                                dataclasses.replace(cmp, implementations=tuple(IMPLEMENTATIONS), amdahl_repeats=2))
        result["implementations"] = impls
        save("implementations")
        print(f"implementations: {time.perf_counter() - t:.0f} s", flush=True)
        print(bench.format_table(impls), flush=True)
        t = time.perf_counter()
        g = plans["uniform-global"]
        sparse = bench.run_bench(model, {"full": None, "uniform-fixed": plans["uniform-fixed"],
                                         **{f"uniform-global@{p}": bench.Variant(g, sparse_path=p)
                                            for p in SPARSE_PATHS}},
                                 dataclasses.replace(cmp, amdahl=False))
        result["sparse_paths"] = sparse
        save("sparse_paths")
        print(f"sparse paths: {time.perf_counter() - t:.0f} s", flush=True)
        print(bench.format_table(sparse), flush=True)

    if args.compile:
        result["compile"] = try_compile(model, args)
    save("done")
    print(f"wrote {args.out} and {args.md} in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return 0


def render_markdown(result: dict, json_path: str, extra: list[str] | None = None) -> str:
    """docs/benchmarks.md from a result of this script (also used by --render-only)."""
    from allocmoe.experts_fast import AUTO_LOOP_MAX_PAIRS

    main_r, impls, sparse, compiled = result["main"], result["implementations"], result["sparse_paths"], \
        result.get("compile") or {}
    sa = result.get("script_args") or {}
    env = main_r["env"]
    load = ""
    if result.get("loadavg_start") and result.get("loadavg_end"):
        busy = max(result["loadavg_start"][0], result["loadavg_end"][0]) > env["threads"] + 0.5
        load = (f" Load average (1 min) at the start / end of the run: {result['loadavg_start'][0]:.2f} / "
                f"{result['loadavg_end'][0]:.2f} on {env['cpu_count']} logical CPUs"
                + (": other jobs ran on the machine and show in the min–max spreads; medians of interleaved runs "
                   "absorb most of it, the ratios of the fastest runs (\"of mins\") are given beside them."
                   if busy else " (about the benchmark's own threads: no other heavy job at those times); the ratios "
                   "of the fastest runs (\"of mins\") are given beside the medians."))
    partial = [] if result.get("complete", True) else [
        "**Partial result**: the run stopped before all stages finished; the sections below are what it measured.",
        ""]
    md = ["# Speed benchmark: DeepSeek-V2-Lite shape, 50% expert-activation budget", "", *partial,
          f"Generated by `scripts/bench_deepseek_v2_lite.py`; every figure below comes from one run of it (raw "
          f"numbers: `{Path(json_path).name}`).{load}", "",
          f"Command: `{result['command']}`", "",
          f"Threads: {env['threads']} (torch.get_num_threads()); torch {env['torch']}, transformers "
          f"{env['transformers']}, Python {env['python']}; {env['dtype']} on {env['device']} ({env['cpu']}, "
          f"{env['cpu_count']} logical CPUs); default experts implementation `{env['experts_implementation']}`; "
          f"allocmoe sparse experts path `{env['sparse_experts_path']}`; wall time "
          f"{result['wall_s'] / 60:.1f} min.", ""]
    md += summary_lines(main_r, impls, sparse)
    md += ["## Full model vs four 50% plans", "", bench.format_table(main_r), ""]
    if impls:
        md += ["## Experts implementations (`config._experts_implementation`)", "",
               f"Ratios are against the full model under the same implementation; `vs_reference_full` in "
               f"{Path(json_path).name} compares with the full model under grouped_mm. `allocmoe` is "
               "`allocmoe.experts_fast`'s kernels registered as a transformers experts implementation (dense calls "
               f"too): per call, one matmul per active expert when the call has at most {AUTO_LOOP_MAX_PAIRS} slots, "
               "the grouped kernel otherwise.", "", bench.format_table(impls), ""]
    if sparse:
        md += ["## allocmoe sparse experts paths (dropped slots), global policy", "",
               "`grouped` = one sort, one gather, one grouped matmul per projection, one index_add (default under "
               "grouped_mm); `loop` = the same with one matmul per active expert; `auto` = loop for calls with at "
               f"most {AUTO_LOOP_MAX_PAIRS} slots, grouped otherwise; `reference` = the previous path (compact, then "
               "the stock experts forward on the pairs as top-1 tokens).", "", bench.format_table(sparse), ""]
    if compiled.get("attempted"):
        md += ["## torch.compile (report only)", "", "```", str(compiled), "```", ""]
    for path in extra or []:
        from allocmoe.io import load_json

        other = load_json(path, "benchmark result")
        om = other["main"]
        oenv = om["env"]
        shape = ", ".join(ph.get("description", name) for name, ph in om["phases"].items())
        md += [f"## Separate run: {oenv['dtype']}; {shape} (raw numbers: `{Path(path).name}`)", "",
               f"Command: `{other['command']}`; threads {oenv['threads']}; wall time {other['wall_s'] / 60:.1f} min.",
               ""]
        md += summary_lines(om, None, None)[2:]
        md += [bench.format_table(om), ""]
    md.append(NOTES.format(layers=sa.get("layers", 4), batched_gib=sa.get("batched_mm_max_gib", 0.5)))
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
