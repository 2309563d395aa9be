"""Measured activation counts of the plugin: written by each vLLM worker, read by /metrics and by tests.

Each worker process that built MoE layers under a plan runs a daemon thread that, every
ALLOCMOE_COUNTS_INTERVAL seconds (default 0.25) when the counts changed, atomically writes
`ALLOCMOE_COUNTS` (rank 0, or `<path>.rank<R>` for the other ranks) as JSON:

    {"format": "allocmoe-vllm-counts", "plan": ..., "planned_activations_per_token": ...,
     "activations_per_token": sum_l pairs_l / tokens_l, "tokens": ...,
     "layers": [{"name", "layer", "k", "original_k", "tokens", "pairs"}, ...]}

`tokens` are the tokens the layer routed and `pairs` the (token, expert) ids its experts kernel was given,
both counted from the routing tensors on the device, so `pairs / tokens` is what vLLM ran, not the plan.
With ALLOCMOE_VLLM_PROFILE=1 (benchmarks, enforce_eager only) each layer also has
`"profile": {"<tokens in the call>": [calls, expert_seconds, pairs, distinct_experts], ...}` (hook._profiled).
"""

from __future__ import annotations

import glob
import json
import os
import threading
import time

FORMAT = "allocmoe-vllm-counts"


def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # pragma: no cover - best effort
        pass
    return int(os.environ.get("RANK", "0") or 0)


def counts_path(rank: int | None = None) -> str | None:
    path = os.environ.get("ALLOCMOE_COUNTS")
    if not path:
        return None
    rank = _rank() if rank is None else rank
    return path if rank == 0 else f"{path}.rank{rank}"


def snapshot(applied: list[dict], plan: dict) -> dict:
    layers = []
    for l in applied:
        tokens, pairs = (int(v) for v in l["runner"].allocmoe_counts.tolist())
        row = {k: l[k] for k in ("name", "layer", "k", "original_k")} | {"tokens": tokens, "pairs": pairs}
        if "profile" in l:  # ALLOCMOE_VLLM_PROFILE=1 (hook._profiled): {tokens per call: [calls, s, pairs, distinct]}
            row["profile"] = {str(t): list(v) for t, v in sorted(dict(l["profile"]).items())}
        layers.append(row)
    return summarize(layers, plan)


def summarize(layers: list[dict], plan: dict | None) -> dict:
    apt = sum(l["pairs"] / l["tokens"] for l in layers if l["tokens"]) if any(l["tokens"] for l in layers) else None
    return {"format": FORMAT, "plan": plan["path"] if plan else None,
            "planned_activations_per_token": sum(plan["ks"]) if plan else None,
            "original_activations_per_token": sum(l["original_k"] for l in layers),
            "activations_per_token": apt, "tokens": max((l["tokens"] for l in layers), default=0),
            "layers": sorted(layers, key=lambda l: l["layer"])}


def _write(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def start_writer(applied: list[dict], plan: dict) -> threading.Thread | None:
    """Start the per-process writer thread (once); returns it, or None without ALLOCMOE_COUNTS."""
    path = counts_path()
    if not path or getattr(start_writer, "_thread", None) is not None:
        return None
    interval = float(os.environ.get("ALLOCMOE_COUNTS_INTERVAL", "0.25"))

    def loop():
        last = None
        while True:
            try:
                data = snapshot(applied, plan)
                key = [(l["tokens"], l["pairs"]) for l in data["layers"]]
                if key != last:
                    _write(path, data)
                    last = key
            except Exception:  # never take the engine down for a counter
                pass
            time.sleep(interval)

    _write(path, snapshot(applied, plan))
    t = threading.Thread(target=loop, name="allocmoe-counts", daemon=True)
    t.start()
    start_writer._thread = t
    return t


def read_counts(path: str | None = None) -> dict | None:
    """The merged counts of every rank's file (a layer seen by several tensor-parallel ranks counts once)."""
    path = path or os.environ.get("ALLOCMOE_COUNTS")
    if not path:
        return None
    layers: dict[int, dict] = {}
    plan_path, planned = None, None
    for f in [path] + sorted(glob.glob(glob.escape(path) + ".rank*")):
        try:
            with open(f, encoding="utf-8") as fh:
                d = json.load(fh)
        except (OSError, ValueError):
            continue
        plan_path, planned = d.get("plan"), d.get("planned_activations_per_token")
        for l in d.get("layers", []):
            if l["layer"] not in layers or l["tokens"] > layers[l["layer"]]["tokens"]:
                layers[l["layer"]] = l
    if not layers:
        return None
    out = summarize(list(layers.values()), None)
    out.update(plan=plan_path, planned_activations_per_token=planned)
    return out


class _Collector:
    """Prometheus collector for the API server's /metrics: reads the workers' counts file on each scrape."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        data = read_counts()
        if not data:
            return
        tok = CounterMetricFamily("allocmoe_routed_tokens", "Tokens routed through each MoE layer (measured).",
                                  labels=["layer", "name"])
        act = CounterMetricFamily("allocmoe_expert_activations",
                                  "(token, expert) pairs run by each MoE layer's experts kernel (measured).",
                                  labels=["layer", "name"])
        for l in data["layers"]:
            tok.add_metric([str(l["layer"]), l["name"]], l["tokens"])
            act.add_metric([str(l["layer"]), l["name"]], l["pairs"])
        yield tok
        yield act
        g = GaugeMetricFamily("allocmoe_activations_per_token",
                              "Measured routed-expert activations per token, summed over MoE layers.")
        g.add_metric([], data["activations_per_token"] or 0.0)
        yield g
        if data.get("planned_activations_per_token") is not None:
            p = GaugeMetricFamily("allocmoe_planned_activations_per_token", "The plan's activations per token.")
            p.add_metric([], data["planned_activations_per_token"])
            yield p


def register_metrics() -> None:
    """Add the collector to prometheus_client's default registry (what vLLM's /metrics serves)."""
    try:
        from prometheus_client import REGISTRY
    except ImportError:  # pragma: no cover
        return
    if not getattr(register_metrics, "_done", False):
        REGISTRY.register(_Collector())
        register_metrics._done = True
