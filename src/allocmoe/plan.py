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

from ._version import __version__
from .adapters import MoELayer, find_moe_layers
from .errors import FileFormatError, ModelMismatchError, PlanError
from .io import atomic_write_json, load_json
from .policies import get_policy
from .schema import PLAN_FORMAT, PLAN_VERSIONS, RENORM_MODES, check_compensation_maps, parse_plan

PLAN_VERSION = PLAN_VERSIONS[-1]  # the version this allocmoe writes (schema.py lists those it reads)


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
        from .compensation_maps import Compensation

        f = Path(self.compensation["file"])
        if not f.is_absolute():
            f = (self.source_dir or Path.cwd()) / f
        maps = Compensation.load(f, expected_sha256=self.compensation["sha256"], model=model)
        # a file fitted for another plan is refused even when its sha256 was copied into this plan
        check_compensation_maps(self.ks, self.original_ks, self.token_policy, [sorted(m) for m in maps.maps],
                                maps.top_k, maps.meta.get("plan"), source=f"compensation file {f}")
        self.compensation_maps = maps
        return self.compensation_maps

    @classmethod
    def from_dict(cls, d: Any, source: str = "plan") -> "Plan":
        """A plan from its JSON (a dict), checked against the plan schema (schema.py): every field's type and
        range, and a calibrated token policy's knob present and finite; `PlanError` naming the field."""
        f = parse_plan(d, source)
        comp = d.get("compensation")
        return cls(layers=copy.deepcopy(d["layers"]), model=copy.deepcopy(d["model"]),
                   token_policy=copy.deepcopy(d["token_policy"]), renormalize=f.renormalize, method=f.method,
                   budget=copy.deepcopy(d.get("budget") or {}), meta=copy.deepcopy(d.get("meta") or {}),
                   version=f.version, compensation=copy.deepcopy(comp) if comp else None)

    @classmethod
    def load(cls, plan: "Plan | dict | str | os.PathLike") -> "Plan":
        if isinstance(plan, Plan):
            plan.validate(require_knobs=True)  # about to be applied: a calibrated policy needs its knob
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
    def validate(self, require_knobs: bool = False) -> None:
        """Internal consistency (model-independent), by the same schema as a plan file (meta excepted: in
        memory it may hold any values). `require_knobs`: a calibrated policy's knob must be there (a plan
        being made may lack it until calibration). `check_model` checks the fit to a model."""
        d = {"format": PLAN_FORMAT, "version": self.version, "method": self.method, "budget": self.budget or None,
             "token_policy": self.token_policy, "renormalize": self.renormalize, "layers": self.layers,
             "model": self.model, "meta": self.meta if not isinstance(self.meta, dict) else None,
             "compensation": self.compensation}
        parse_plan(d, "plan", require_knobs=require_knobs)

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
