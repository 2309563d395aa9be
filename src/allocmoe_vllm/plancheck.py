"""Reading an allocmoe plan for vLLM and checking it against a model's Hugging Face config (stdlib only).

Shared by the plugin (inside every vLLM process) and by `allocmoe serve --engine vllm` (before vLLM starts),
so both refuse the same plans with the same one-line messages. No torch, transformers or vLLM import here:
the vLLM environment pins an older transformers than allocmoe's own, and this module must not care.

What vLLM can run: a `fixed` token policy (every token of layer l takes exactly k_l experts) with the
family's own (`native`) weights or `keep-weights` (each kept expert keeps its full-model weight; hook.py
rescales a softmax router's renormalised weights) and no compensation. vLLM's fused MoE takes one `top_k` per layer, fixed
when the layer is built; its kernels run exactly top_k (token, expert) pairs per token, so a per-layer k
is a real saving. Per-token counts (`global`, `threshold`, `top-p`, `naee`) would need the kernels to skip
dropped slots; the CPU kernels have no such path (a slot is an expert id in [0, E); a zero weight is still
computed), so those plans are refused rather than faked with zero weights.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

PLAN_FORMAT = "allocmoe-plan"
PLAN_VERSION = 1
# keys of the plan's model fingerprint compared with the model vLLM loads (as allocmoe.plan compares them)
CONFIG_KEYS = ("architecture", "num_experts", "top_k", "hidden_size", "num_hidden_layers")
# native: vLLM's router as the family has it; keep-weights: each kept expert keeps its full-model weight (the
# plugin rescales a renormalising softmax router's weights by kept mass / original top-K mass, hook.py)
VLLM_RENORM_MODES = ("native", "keep-weights")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


class VllmPlanError(ValueError):
    """A plan that cannot be served by vLLM, or one made for another model; the message is one line."""


def plan_from_env(hf_config=None) -> str | None:
    """The plan path named for this vLLM run: `--hf-overrides '{"allocmoe_plan": "plan.json"}'` (seen as an
    attribute of the model's config) or the ALLOCMOE_PLAN environment variable (hf_overrides wins)."""
    path = getattr(hf_config, "allocmoe_plan", None) if hf_config is not None else None
    return str(path) if path else (os.environ.get("ALLOCMOE_PLAN") or None)


def load_plan(path: str | os.PathLike) -> dict:
    """Parse and validate a plan file for vLLM; every problem is a one-line `VllmPlanError`."""
    p = Path(path)
    if not p.is_file():
        raise VllmPlanError(f"plan file {p} does not exist")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VllmPlanError(f"plan file {p} is not valid JSON ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
        raise VllmPlanError(f"plan file {p} is not an allocmoe plan (format is "
                            f"{d.get('format') if isinstance(d, dict) else None!r}, expected {PLAN_FORMAT!r})")
    if d.get("version") != PLAN_VERSION:
        raise VllmPlanError(f"plan file {p} has unknown plan version {d.get('version')!r} "
                            f"(this plugin reads version {PLAN_VERSION})")
    layers, model, tp = d.get("layers"), d.get("model"), d.get("token_policy")
    if not isinstance(layers, list) or not layers or not isinstance(model, dict) or not isinstance(tp, dict):
        raise VllmPlanError(f"plan file {p} lacks a non-empty 'layers' list, a 'model' object or a 'token_policy'")
    for i, row in enumerate(layers):
        k = row.get("k") if isinstance(row, dict) else None
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise VllmPlanError(f"plan file {p}: layers[{i}] must be an object with an integer 'k' >= 1")
    policy = tp.get("name")
    if policy != "fixed":
        raise VllmPlanError(
            f"token policy {policy!r} cannot run on vLLM: its fused MoE runs one top_k per layer for every token and "
            f"its kernels cannot skip a dropped (token, expert) slot, so per-token counts would save nothing; "
            f"make the plan with --token-policy fixed")
    if d.get("compensation"):
        raise VllmPlanError("plans with dropped-expert compensation cannot run on vLLM (its fused MoE has no hook "
                            "for the compensation maps); make the plan without --compensate")
    renorm = d.get("renormalize", "native")
    if renorm not in VLLM_RENORM_MODES:
        raise VllmPlanError(f"renormalize mode {renorm!r} cannot run on vLLM (its router applies the family's own "
                            f"weights; the plugin can also undo a softmax router's renormalisation): make the plan "
                            f"with renormalize {' or '.join(repr(m) for m in VLLM_RENORM_MODES)}")
    names = [row.get("name") for row in layers]
    if not all(isinstance(n, str) for n in names):
        names = model.get("moe_layer_names")
    if not isinstance(names, list) or len(names) != len(layers) or not all(isinstance(n, str) for n in names):
        raise VllmPlanError(f"plan file {p} does not name its MoE layers (layers[i].name or model.moe_layer_names)")
    index = {}
    for name, row in zip(names, layers):
        m = _LAYER_RE.search(name)
        if not m:
            raise VllmPlanError(f"plan file {p}: cannot find the decoder layer number in MoE layer name {name!r}")
        index[int(m.group(1))] = int(row["k"])
    n = model.get("num_moe_layers")
    if n is not None and n != len(layers):
        raise VllmPlanError(f"plan file {p} has {len(layers)} layers but its model fingerprint has {n} MoE layers")
    return {"path": str(p.resolve()), "model": model, "k_by_layer": index, "ks": [int(r["k"]) for r in layers],
            "budget": d.get("budget") or {}, "renormalize": renorm}


def layer_index(prefix: str) -> int | None:
    """Decoder layer number in a module name such as `model.layers.3.mlp.experts`."""
    m = _LAYER_RE.search(prefix or "")
    return int(m.group(1)) if m else None


def _get(cfg, name):
    return cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)


def config_fingerprint(cfg) -> dict:
    """The fingerprint keys readable from a Hugging Face config (a dict from config.json, or a config
    object); the text config of a multimodal wrapper is used when there is one."""
    text = _get(cfg, "text_config")
    inner = text if text is not None and _get(text, "hidden_size") is not None else cfg
    archs = _get(cfg, "architectures") or []
    experts = next((v for v in (_get(inner, n) for n in ("num_experts", "num_local_experts", "n_routed_experts"))
                    if isinstance(v, int)), None)
    return {"architecture": archs[0] if archs else None, "num_experts": experts,
            "top_k": _get(inner, "num_experts_per_tok"), "hidden_size": _get(inner, "hidden_size"),
            "num_hidden_layers": _get(inner, "num_hidden_layers")}


def check_fingerprint(plan: dict, actual: dict, where: str = "the model") -> None:
    """Refuse a plan made for another model: compare the keys both sides know (as allocmoe.plan does)."""
    expected = plan["model"]
    for key in CONFIG_KEYS:
        want, have = expected.get(key), actual.get(key)
        if want is None or have is None:
            continue
        if isinstance(want, list) and key in ("num_experts", "top_k") and len(set(want)) == 1:
            want = want[0]
        if want != have:
            src = f" ({expected['name_or_path']})" if expected.get("name_or_path") else ""
            raise VllmPlanError(f"plan {plan['path']} was made for another model: {key} is {want!r} in the plan "
                                f"but {have!r} in {where}{src}")
