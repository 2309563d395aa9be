"""The allocation plan: per-MoE-layer expert counts, the token policy, the budget, and the model it fits.

A plan is plain data (JSON-serialisable, versioned) so it can be made on one machine, inspected, and
applied to the same model elsewhere. `Plan.load` accepts a Plan, a dict or a path; every problem is a
`PlanError` with a one-line message.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from . import __version__
from .adapters import MoELayer, find_moe_layers
from .errors import FileFormatError, ModelMismatchError, PlanError
from .io import atomic_write_json, load_json
from .policies import get_policy

PLAN_FORMAT = "allocmoe-plan"
PLAN_VERSION = 1
RENORM_MODES = ("native", "renorm", "keep-mass")


def model_description(model: nn.Module | None, layers: list[MoELayer] | None = None) -> dict:
    """What allocmoe knows about a model's MoE structure (`allocmoe info`; the fingerprint is a subset)."""
    layers = layers if layers is not None else find_moe_layers(model)
    cfg = getattr(model, "config", None)
    archs = getattr(cfg, "architectures", None) or ([type(model).__name__] if model is not None else ["?"])
    experts = sorted({l.num_experts for l in layers})
    topk = sorted({l.top_k for l in layers})
    n_decoder = getattr(cfg, "num_hidden_layers", None)
    return {
        "architecture": archs[0],
        "model_type": str(getattr(cfg, "model_type", "?")),
        "family": layers[0].adapter.name,
        "decoder_layers": n_decoder,
        "moe_layers": len(layers),
        "moe_layer_names": [l.name for l in layers],
        "dense_layers": (n_decoder or len(layers)) - len(layers),
        "num_experts": experts[0] if len(experts) == 1 else [l.num_experts for l in layers],
        "top_k": topk[0] if len(topk) == 1 else [l.top_k for l in layers],
        "shared_experts": layers[0].shared_experts,
        "activations_per_token": sum(l.top_k for l in layers),
        "routing": layers[0].adapter.describe(layers[0].router),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "name_or_path": str(getattr(cfg, "_name_or_path", "") or ""),
    }


def fingerprint(layers: list[MoELayer], model: nn.Module | None = None) -> dict:
    """What a plan or profile must match to be applied to a model (a subset of `model_description`)."""
    d = model_description(model, layers)
    return {
        "architecture": d["architecture"],
        "model_type": d["model_type"],
        "num_moe_layers": d["moe_layers"],
        "moe_layer_names": d["moe_layer_names"],
        "num_experts": d["num_experts"],
        "top_k": d["top_k"],
        "shared_experts": d["shared_experts"],
        "hidden_size": d["hidden_size"],
        "num_hidden_layers": d["decoder_layers"],
        "name_or_path": d["name_or_path"],
    }


# Keys compared when checking that a plan/profile fits a model (name_or_path is informational only).
FINGERPRINT_KEYS = ("architecture", "num_moe_layers", "num_experts", "top_k", "hidden_size", "num_hidden_layers")


def check_fingerprint(expected: dict, actual: dict, what: str = "plan") -> None:
    for key in FINGERPRINT_KEYS:
        if key in expected and expected.get(key) != actual.get(key):
            raise ModelMismatchError(
                f"this {what} was made for another model: {key} is {expected.get(key)!r} in the {what} "
                f"but {actual.get(key)!r} in the model"
                + (f" ({expected.get('name_or_path')})" if expected.get("name_or_path") else "")
            )


def _per_layer(value: Any, n: int) -> list:
    return list(value) if isinstance(value, list) else [value] * n


@dataclass
class Plan:
    layers: list[dict]  # one dict per MoE layer, in model order; each has at least "k"
    model: dict  # fingerprint()
    token_policy: dict = field(default_factory=lambda: {"name": "fixed"})
    renormalize: str = "native"
    method: str = "manual"
    budget: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    version: int = PLAN_VERSION
    # optional dropped-expert compensation (issue: compensation.py): `compensation` is the JSON reference
    # {"file", "sha256", ...summary}; `compensation_maps` the fitted object (in memory, not serialised);
    # `source_dir` the folder of the plan file it was loaded from (a relative "file" is looked up there)
    compensation: dict | None = None
    compensation_maps: Any = field(default=None, repr=False, compare=False)
    source_dir: Path | None = field(default=None, repr=False, compare=False)

    # --- derived ---------------------------------------------------------------------------
    @property
    def ks(self) -> list[int]:
        return [int(l["k"]) for l in self.layers]

    @property
    def original_ks(self) -> list[int]:
        return _per_layer(self.model["top_k"], len(self.layers))

    @property
    def policy(self) -> str:
        return self.token_policy["name"]

    def compute_budget(self) -> dict:
        total, orig = sum(self.ks), sum(self.original_ks)
        return {
            "activations_per_token": total,
            "original_activations_per_token": orig,
            "fraction": round(total / orig, 6),
            "note": "planned; reports use measured counts" if self.policy != "fixed" else "exact for every token",
        }

    # --- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": self.version,
            "method": self.method,
            "budget": self.budget or self.compute_budget(),
            "token_policy": self.token_policy,
            "renormalize": self.renormalize,
            "layers": self.layers,
            "model": self.model,
            "meta": self.meta,
            **({"compensation": self.compensation} if self.compensation else {}),
        }

    @staticmethod
    def compensation_path(path: str | os.PathLike) -> Path:
        """Where `save(path)` writes the compensation maps: beside the plan, `<stem>.compensation.safetensors`."""
        path = Path(path)
        return path.with_name(path.stem + ".compensation.safetensors")

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan JSON (atomically); with fitted compensation maps, first the safetensors file beside
        it, referenced from the JSON by file name and sha256."""
        if self.compensation_maps is not None:
            cpath = self.compensation_path(path)
            sha = self.compensation_maps.save(cpath)
            self.compensation = {**(self.compensation or {}), "file": cpath.name, "sha256": sha}
            self.source_dir = cpath.parent
        atomic_write_json(path, self.to_dict())

    def load_compensation(self, model: nn.Module | None = None):
        """The compensation maps (None when the plan has none); loads and checks the referenced file."""
        if self.compensation_maps is not None or not self.compensation:
            return self.compensation_maps
        from .compensation import Compensation

        f = Path(self.compensation["file"])
        if not f.is_absolute():
            f = (self.source_dir or Path.cwd()) / f
        self.compensation_maps = Compensation.load(f, expected_sha256=self.compensation["sha256"], model=model)
        return self.compensation_maps

    @classmethod
    def from_dict(cls, d: Any, source: str = "plan") -> "Plan":
        if not isinstance(d, dict):
            raise PlanError(f"{source} is not a JSON object")
        if d.get("format") != PLAN_FORMAT:
            raise PlanError(f"{source} is not an allocmoe plan (format is {d.get('format')!r}, expected {PLAN_FORMAT!r})")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"{source} has unknown plan version {d.get('version')!r} (this allocmoe reads version {PLAN_VERSION})")
        for key in ("layers", "model", "token_policy"):
            if key not in d:
                raise PlanError(f"{source} has no {key!r} field")
        if not isinstance(d["layers"], list) or not d["layers"]:
            raise PlanError(f"{source}: 'layers' must be a non-empty list")
        for i, l in enumerate(d["layers"]):
            if not isinstance(l, dict) or not isinstance(l.get("k"), int) or isinstance(l.get("k"), bool):
                raise PlanError(f"{source}: layers[{i}] must be an object with an integer 'k'")
        tp = d["token_policy"]
        if not isinstance(tp, dict) or "name" not in tp:
            raise PlanError(f"{source}: 'token_policy' must be an object with a 'name'")
        comp = d.get("compensation")
        if comp is not None and not (isinstance(comp, dict) and isinstance(comp.get("file"), str)
                                     and isinstance(comp.get("sha256"), str)):
            raise PlanError(f"{source}: 'compensation' must be an object with a 'file' and its 'sha256'")
        plan = cls(layers=copy.deepcopy(d["layers"]), model=dict(d["model"]), token_policy=dict(tp),
                   renormalize=d.get("renormalize", "native"), method=d.get("method", "manual"),
                   budget=dict(d.get("budget") or {}), meta=dict(d.get("meta") or {}), version=d["version"],
                   compensation=dict(comp) if comp else None)
        plan.validate()
        return plan

    @classmethod
    def load(cls, plan: "Plan | dict | str | os.PathLike") -> "Plan":
        if isinstance(plan, Plan):
            plan.validate()
            return plan
        if isinstance(plan, dict):
            return cls.from_dict(plan)
        path = Path(plan)
        try:
            data = load_json(path, "plan file")
        except FileFormatError as e:
            raise PlanError(str(e)) from None
        plan = cls.from_dict(data, source=f"plan {path}")
        plan.source_dir = path.resolve().parent
        return plan

    # --- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Internal consistency (model-independent). `check_model` checks the fit to a model."""
        n = self.model.get("num_moe_layers")
        if n is not None and n != len(self.layers):
            raise PlanError(f"plan has {len(self.layers)} layers but its model fingerprint has {n} MoE layers")
        name = self.policy
        pol = get_policy(name)
        if self.renormalize not in RENORM_MODES:
            raise PlanError(f"unknown renormalize mode {self.renormalize!r} (choose from {', '.join(RENORM_MODES)})")
        experts = _per_layer(self.model.get("num_experts"), len(self.layers))
        min_k, max_k = self.token_policy.get("min_k", 1), self.token_policy.get("max_k")
        if not isinstance(min_k, int) or min_k < 1:
            raise PlanError(f"token policy min_k must be an integer >= 1, got {min_k!r}")
        for i, (k, e) in enumerate(zip(self.ks, experts)):
            hi = e if max_k is None else min(e, max_k)
            lo = min_k if pol.k_at_least_min_k else 1
            if not (lo <= k <= hi):
                raise PlanError(f"layer {i}: k={k} is out of range [{lo}, {hi}]"
                                + (" (min_k/max_k of the token policy)" if not pol.exact else ""))
        if max_k is not None and (not isinstance(max_k, int) or max_k < min_k):
            raise PlanError(f"token policy max_k must be an integer >= min_k ({min_k}), got {max_k!r}")

    def check_model(self, layers: list[MoELayer], model: nn.Module | None = None) -> None:
        if len(layers) != len(self.layers):
            raise ModelMismatchError(
                f"plan has {len(self.layers)} MoE layers but the model has {len(layers)}: it was made for another model")
        check_fingerprint(self.model, fingerprint(layers, model))


def make_plan(model_or_layers, ks: list[int], *, token_policy: str | dict = "fixed", renormalize: str = "native",
              method: str = "manual", model: nn.Module | None = None, meta: dict | None = None,
              layer_params: list[dict] | None = None) -> Plan:
    """Build and validate a plan for `model` (or its MoE layers) with per-layer counts `ks`."""
    if isinstance(model_or_layers, nn.Module):
        model = model_or_layers
        layers = find_moe_layers(model)
    else:
        layers = model_or_layers
    if len(ks) != len(layers):
        raise PlanError(f"got {len(ks)} per-layer counts for a model with {len(layers)} MoE layers")
    tp = {"name": token_policy} if isinstance(token_policy, str) else dict(token_policy)
    for key, value in get_policy(tp.get("name")).defaults(list(ks), max(l.top_k for l in layers)).items():
        tp.setdefault(key, value)
    rows = []
    for i, (layer, k) in enumerate(zip(layers, ks)):
        row = {"k": int(k), "name": layer.name}
        if layer_params:
            row.update(layer_params[i])
        rows.append(row)
    plan = Plan(layers=rows, model=fingerprint(layers, model), token_policy=tp, renormalize=renormalize,
                method=method, meta=dict(meta or {}, created_with=f"allocmoe {__version__}"))
    plan.budget = plan.compute_budget()
    plan.validate()
    return plan


def full_plan(model: nn.Module) -> Plan:
    """The identity plan: every layer at its original top-K, fixed policy (used to count the full model)."""
    layers = find_moe_layers(model)
    return make_plan(layers, [l.top_k for l in layers], model=model, method="full")
