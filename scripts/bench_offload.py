"""Peak memory and wall time of profiling a model bigger than its memory cap (accelerate offload) vs in memory.

    python scripts/bench_offload.py --shape deepseek-v2-lite:3 --max-memory cpu=3GiB --out docs/offload_bench.json

1. builds the random-weight shape (allocmoe.shapes) once and saves it as a checkpoint (save_pretrained);
2. profiles it in a fresh process per configuration (in memory; `load_model(max_memory=...)`, which offloads
   the layers beyond the cap to disk), each on the same random token windows, measuring the process's
   peak resident set (ru_maxrss) and the wall time of loading + profiling;
3. checks the two profiles are equal and prints a markdown table.
The configurations alternate (in, off, in, off, ...) so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _status() -> dict:
    """VmHWM (peak RSS), RssAnon (memory the process owns) and RssFile (mapped file pages: the checkpoint and the
    offload files, page cache the kernel can drop) from /proc/self/status, in bytes."""
    d = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                d[key] = int(val.split()[0]) * 1024
    return d


class _Peaks:
    """Samples RssAnon / RssFile every 10 ms in a thread; `phase()` returns and resets the peaks."""

    def __init__(self):
        import threading

        self.anon = self.file = 0
        self.stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.stop:
            d = _status()
            self.anon, self.file = max(self.anon, d["RssAnon"]), max(self.file, d["RssFile"])
            time.sleep(0.01)

    def phase(self) -> dict:
        d = _status()
        out = {"peak_anon_bytes": max(self.anon, d["RssAnon"]), "peak_file_bytes": max(self.file, d["RssFile"])}
        self.anon, self.file = d["RssAnon"], d["RssFile"]
        return out


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import allocmoe
    from allocmoe.models import load_model

    peaks = _Peaks()
    t0 = time.perf_counter()
    model, _, _ = load_model(args.dir, "float32", max_memory=args.max_memory or None,
                             offload_dir=args.offload_dir or None)
    t_load = time.perf_counter() - t0
    load = peaks.phase()
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (args.windows, args.seq_len), generator=g)
    t1 = time.perf_counter()
    prof = allocmoe.profile(model, windows, batch_size=args.windows, progress=False)
    t_prof = time.perf_counter() - t1
    run = peaks.phase()
    placed = sorted(set(getattr(model, "hf_device_map", {"": "cpu"}).values()))
    print(json.dumps({"load_s": t_load, "profile_s": t_prof, "total_s": time.perf_counter() - t0,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "load": load, "profile": run, "placement": placed, "sensitivity": prof.metrics}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="deepseek-v2-lite:3")
    ap.add_argument("--dir", default="/tmp/allocmoe-offload-bench/model")
    ap.add_argument("--max-memory", default="cpu=3GiB")
    ap.add_argument("--offload-dir", default="")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        return child(args)

    d = Path(args.dir)
    if not (d / "config.json").exists():
        from allocmoe.shapes import build_shape

        t = time.perf_counter()
        build_shape(args.shape).save_pretrained(d)
        print(f"saved {args.shape} to {d} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    runs = {"in memory": [], f"--max-memory {args.max_memory}": []}
    base = [sys.executable, __file__, "--child", "--dir", str(d), "--windows", str(args.windows),
            "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for _ in range(args.repeats):
        for name, extra in (("in memory", ["--max-memory", ""]),
                            (f"--max-memory {args.max_memory}", ["--max-memory", args.max_memory,
                                                                  "--offload-dir", str(d.parent / "offload")])):
            r = subprocess.run(base + extra, capture_output=True, text=True, env=env)
            if r.returncode:
                sys.exit(r.stderr[-3000:])
            runs[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(name, {k: v for k, v in runs[name][-1].items() if k != "sensitivity"}, file=sys.stderr)
    names = list(runs)
    same = all(r["sensitivity"] == runs[names[0]][0]["sensitivity"] for n in names for r in runs[n])
    import statistics as st

    gib = 2**30
    rows = []
    for n in names:
        rs = runs[n]
        rows.append({"run": n, "on": ", ".join(rs[0]["placement"]),
                     "rss": max(r["peak_rss_bytes"] for r in rs) / gib,
                     "anon_load": max(r["load"]["peak_anon_bytes"] for r in rs) / gib,
                     "anon_prof": max(r["profile"]["peak_anon_bytes"] for r in rs) / gib,
                     "file_prof": max(r["profile"]["peak_file_bytes"] for r in rs) / gib,
                     "wall": st.median(r["total_s"] for r in rs), "load_s": st.median(r["load_s"] for r in rs),
                     "prof_s": st.median(r["profile_s"] for r in rs)})
    a, b = rows
    md = [f"checkpoint `{args.shape}`: {size / gib:.2f} GiB (float32 safetensors); profile of {args.windows} x "
          f"{args.seq_len} random tokens (batch {args.windows}), {args.threads} thread, median of {args.repeats} "
          f"alternating runs per configuration (fresh process each); profiles identical: {same}", "",
          "| run | weights on | peak RSS | peak anonymous, loading | peak anonymous, profiling | "
          "mapped file pages, profiling | wall: load + profile |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['run']} | {r['on']} | {r['rss']:.2f} GiB | {r['anon_load']:.2f} GiB | {r['anon_prof']:.2f} GiB | "
           f"{r['file_prof']:.2f} GiB | {r['load_s']:.1f} + {r['prof_s']:.1f} = {r['wall']:.1f} s |" for r in rows]
    md += ["", f"offloaded / in memory: peak RSS {b['rss'] / a['rss']:.2f}, peak anonymous memory while profiling "
               f"{b['anon_prof'] / a['anon_prof']:.2f}, wall time {b['wall'] / a['wall']:.2f} "
               f"(profiling alone {b['prof_s'] / a['prof_s']:.2f})"]
    print("\n".join(md))
    if args.out:
        Path(args.out).write_text(json.dumps({"shape": args.shape, "checkpoint_bytes": size, "runs": {
            n: [{k: v for k, v in r.items() if k != "sensitivity"} for r in runs[n]] for n in names},
            "profiles_identical": same, "markdown": md}, indent=1))


if __name__ == "__main__":
    main()
