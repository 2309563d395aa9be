"""The declared schemas of allocmoe's JSON file formats: plans (`PlanFile`) and profiles (`ProfileFile`).

Every file (or dict) that `Plan.load` / `Profile.load` reads goes through one pydantic model here, in strict
mode: each field's type and range is checked on load, so a malformed file ends in one `PlanError` /
`ProfileError` naming the field, e.g. ``plan p.json: layers[3].k: must be an integer >= 1, got -1``, never in
a traceback later (in the middle of a forward pass) or a silently different run.

What is checked beyond the types:
- the fingerprint: per-layer lists (`num_experts`, `top_k`, `moe_layer_names`) have one entry per MoE layer,
  top-k <= experts;
- plans: one layer row per MoE layer; each k within [min_k (policies that floor at it) or 1, min(experts,
  max_k)]; a registered token policy (read from the policy registry at load time, so a policy registered
  later is known); min_k <= max_k <= experts for policies with variable counts; the knob of a calibrated
  policy (`TokenPolicy.param`) finite wherever it appears, within `param_range` when it is one shared value
  (a per-layer knob is in the router's score units, which differ by family), and present for every layer
  when the plan is loaded or applied (`require_knobs`; a plan still being made may lack it);
- profiles: k_values strictly ascending, one row of len(k_values) finite values per MoE layer in
  `sensitivity` and in every matrix of `metrics`, k_values within the experts;
- `check_compensation_maps`: a plan's compensation file has maps for the plan's layers (same original
  top-k) and only for kept counts the plan's token policy can produce.

Free-form parts (`meta`, a profile's `data` / `settings`) must be objects of JSON values. Unknown top-level
keys are ignored and unknown keys inside rows, policies and fingerprints are kept, so files written by a
newer allocmoe with extra fields still load. This module imports no other allocmoe module that reads files
(plan.py and profiling.py import it).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import (BaseModel, ConfigDict, Field, JsonValue, Strict, ValidationError, ValidationInfo,
                      WrapValidator, model_validator)
from pydantic_core import PydanticCustomError

from .errors import PlanError, ProfileError
from .policies import TOKEN_POLICIES

PLAN_FORMAT = "allocmoe-plan"
PLAN_VERSIONS = (1,)  # plan versions this allocmoe reads; the last is the one it writes
PROFILE_FORMAT = "allocmoe-profile"
PROFILE_VERSIONS = (1,)
RENORM_MODES = ("native", "renorm", "keep-mass", "keep-weights")

__all__ = [
    "PLAN_FORMAT", "PLAN_VERSIONS", "PROFILE_FORMAT", "PROFILE_VERSIONS", "RENORM_MODES", "Fingerprint",
    "PlanFile", "ProfileFile", "parse_plan", "parse_profile", "check_compensation_maps",
]


# --------------------------------------------------------------------------------------------------
# scalar types with one readable message each


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _described(text: str) -> WrapValidator:
    """Replace whatever pydantic says about a bad value by `text`, got <value>."""
    def wrap(v, handler):
        try:
            return handler(v)
        except ValidationError:
            raise PydanticCustomError("value", "{text}, got {got}", {"text": text, "got": _show(v)}) from None
    return WrapValidator(wrap)


def _int(lo: int) -> Any:
    return Annotated[int, Strict(), Field(ge=lo), _described(f"must be an integer >= {lo}")]


Int0, Int1 = _int(0), _int(1)
Finite = Annotated[float, Strict(), Field(allow_inf_nan=False), _described("must be a finite number")]
FiniteNonNeg = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False),
                         _described("must be a finite number >= 0")]
Str = Annotated[str, Strict(), _described("must be a string")]
Name = Annotated[str, Strict(), Field(min_length=1), _described("must be a non-empty string")]
PerLayerInt = Annotated[Int1 | list[Int1], _described("must be an integer >= 1 or a list of them (one per MoE layer)")]
Sha256 = Annotated[str, Strict(), Field(pattern=r"^(sha256:)?[0-9a-fA-F]{64}$"),
                   _described("must be a sha256 hex digest (64 hex digits)")]
Matrix = Annotated[list[Annotated[list[Finite], Field(min_length=1)]], Field(min_length=1)]
JsonObject = dict[str, JsonValue]


def _fail(message: str, **values: Any):
    """A cross-field problem (raised inside a validator; `message` may use {name} for `values`)."""
    raise PydanticCustomError("allocmoe", message, {k: v for k, v in values.items()})


class _Object(BaseModel):
    """A JSON object whose unknown keys are kept (rows, policies, fingerprints)."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class _File(BaseModel):
    """A whole file: unknown top-level keys are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


def _per_layer(value: Any, n: int) -> list:
    return list(value) if isinstance(value, list) else [value] * n


# --------------------------------------------------------------------------------------------------
# the fingerprint (shared by plans and profiles)


class Fingerprint(_Object):
    """The model a plan or profile was made for (plan.fingerprint())."""

    architecture: Name
    model_type: Str | None = None
    num_moe_layers: Int1
    moe_layer_names: list[Str] | None = None
    num_experts: PerLayerInt
    top_k: PerLayerInt
    shared_experts: Int0 | None = None
    hidden_size: Int1 | None = None
    num_hidden_layers: Int1 | None = None
    name_or_path: Str | None = None

    @model_validator(mode="after")
    def _consistent(self):
        n = self.num_moe_layers
        for key in ("num_experts", "top_k", "moe_layer_names"):
            v = getattr(self, key)
            if isinstance(v, list) and len(v) != n:
                _fail("{key} has {m} entries but num_moe_layers is {n}", key=key, m=len(v), n=n)
        for i, (k, e) in enumerate(zip(self.original_ks(), self.experts())):
            if k > e:
                _fail("top_k {k} is more than the {e} experts of MoE layer {i}", k=k, e=e, i=i)
        return self

    def experts(self) -> list[int]:
        return _per_layer(self.num_experts, self.num_moe_layers)

    def original_ks(self) -> list[int]:
        return _per_layer(self.top_k, self.num_moe_layers)


# --------------------------------------------------------------------------------------------------
# plans


class LayerRow(_Object):
    k: Int1
    name: Str | None = None


class TokenPolicyField(_Object):
    name: Name
    min_k: Int1 = 1
    max_k: Int1 | None = None

    @model_validator(mode="after")
    def _known(self):
        if self.name not in TOKEN_POLICIES:  # the live registry: policies registered after import count
            _fail("unknown token policy {name} (choose from {names})", name=repr(self.name),
                  names=", ".join(TOKEN_POLICIES))
        if self.max_k is not None and self.max_k < self.min_k:
            _fail("max_k ({hi}) must be >= min_k ({lo})", hi=self.max_k, lo=self.min_k)
        return self


class BudgetField(_Object):
    activations_per_token: FiniteNonNeg | None = None
    original_activations_per_token: FiniteNonNeg | None = None
    fraction: FiniteNonNeg | None = None
    note: Str | None = None
    measured_on_calibration: FiniteNonNeg | None = None


class CompensationRef(_Object):
    file: Name
    sha256: Sha256


class PlanFile(_File):
    format: Str
    version: Int1
    method: Name = "manual"
    budget: BudgetField | None = None
    token_policy: TokenPolicyField
    renormalize: Str = "native"
    layers: Annotated[list[LayerRow], Field(min_length=1)]
    model: Fingerprint
    meta: JsonObject | None = None
    compensation: CompensationRef | None = None

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo):
        if self.renormalize not in RENORM_MODES:
            _fail("unknown renormalize mode {m} (choose from {modes})", m=repr(self.renormalize),
                  modes=", ".join(RENORM_MODES))
        n, fp, tp = len(self.layers), self.model, self.token_policy
        if n != fp.num_moe_layers:
            _fail("plan has {n} layers but its model fingerprint has {m} MoE layers", n=n, m=fp.num_moe_layers)
        pol = TOKEN_POLICIES[tp.name]
        experts, orig = fp.experts(), fp.original_ks()
        for i, (row, e) in enumerate(zip(self.layers, experts)):
            hi = e if tp.max_k is None else min(e, tp.max_k)
            lo = tp.min_k if pol.k_at_least_min_k else 1
            if not lo <= row.k <= hi:
                _fail("layers[{i}].k: k={k} is out of range [{lo}, {hi}]{why}", i=i, k=row.k, lo=lo, hi=hi,
                      why=" (min_k/max_k of the token policy)" if not pol.exact else "")
        if not pol.exact:  # variable counts: each token's candidates are its best max_k experts
            for i, (row, e, K) in enumerate(zip(self.layers, experts, orig)):
                width = tp.max_k if tp.max_k is not None else max(K, row.k)
                if width > e:
                    _fail("token_policy.max_k: {w} is more than the {e} experts of MoE layer {i}", w=width, e=e, i=i)
                if tp.min_k > width:
                    _fail("token_policy.min_k: {lo} is more than the {w} candidate experts of layer {i}",
                          lo=tp.min_k, w=width, i=i)
        if pol.calibrated and pol.param:
            _check_knobs(self, pol, bool((info.context or {}).get("require_knobs", True)))
        return self


def _knob_value(where: str, value: Any, lo: float | None, hi: float | None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = lo <= value <= hi
    if not ok:
        rng = f" in [{lo}, {hi}]" if lo is not None else ""
        _fail("{where}: must be a finite number{rng} (a calibrated knob), got {got}", where=where, rng=rng,
              got=_show(value))


def _check_knobs(plan: PlanFile, pol, require: bool) -> None:
    """The calibrated knob: finite wherever it is, in range when shared, and there for every layer."""
    key = pol.param
    shared = plan.token_policy.model_extra or {}
    rows = [r.model_extra or {} for r in plan.layers]
    lo, hi = (None, None) if pol.per_layer_param else pol.param_range  # per-layer knobs are in score units
    if key in shared:
        _knob_value(f"token_policy.{key}", shared[key], lo, hi)
    for i, extra in enumerate(rows):
        if key in extra:
            _knob_value(f"layers[{i}].{key}", extra[key], lo, hi)
    if not require:
        return
    if pol.per_layer_param:
        missing = [i for i, extra in enumerate(rows) if key not in extra and key not in shared]
        if missing:
            _fail("layers[{i}]: has no {key}, the per-layer knob of token policy {name}: the plan was not "
                  "calibrated (allocate calibrates it)", i=missing[0], key=repr(key), name=repr(pol.name))
    elif key not in shared and any(key not in extra for extra in rows):
        _fail("token_policy: has no {key}, the knob of token policy {name}: the plan was not calibrated "
              "(allocate calibrates it)", key=repr(key), name=repr(pol.name))


# --------------------------------------------------------------------------------------------------
# profiles


class ProfileFile(_File):
    format: Str
    version: Int1
    metric: Name
    k_values: Annotated[list[Int1], Field(min_length=1)]
    sensitivity: Matrix
    tokens: Int0 = 0
    model: Fingerprint
    data: JsonObject | None = None
    metrics: dict[str, Matrix] | None = None
    settings: JsonObject | None = None
    operating_point: JsonObject | None = None  # where the other layers ran (absent in older profiles: full K)

    @model_validator(mode="after")
    def _consistent(self):
        ks, S, fp = self.k_values, self.sensitivity, self.model
        if any(a >= b for a, b in zip(ks, ks[1:])):
            _fail("k_values: must be strictly ascending, got {ks}", ks=_show(ks))
        if max(ks) > min(fp.experts()):
            _fail("k_values: {k} is more than the {e} experts of a MoE layer", k=max(ks), e=min(fp.experts()))
        for name, mat in [("sensitivity", S)] + sorted((self.metrics or {}).items()):
            where = "sensitivity" if name == "sensitivity" else f"metrics.{name}"
            bad = next((i for i, r in enumerate(mat) if len(r) != len(ks)), None)
            if bad is not None:
                _fail("{where}: must have one row of {n} values per MoE layer (row {i} has {m})", where=where,
                      n=len(ks), i=bad, m=len(mat[bad]))
            if len(mat) != fp.num_moe_layers:
                _fail("{where}: {r} rows but the model fingerprint has {n} MoE layers", where=where, r=len(mat),
                      n=fp.num_moe_layers)
        if self.metrics and self.metric not in self.metrics:
            _fail("metric: {m} is not one of its metrics ({names})", m=repr(self.metric),
                  names=", ".join(self.metrics))
        return self


# --------------------------------------------------------------------------------------------------
# parsing: prechecks (is it this format, which version) then the schema; one-line errors


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


_FREE_FORM = ("meta", "data", "settings")  # JsonValue fields: pydantic tags each nested level 'dict' / 'list'


def _loc(loc: tuple) -> str:
    if loc and loc[0] in _FREE_FORM:
        loc = tuple(p for i, p in enumerate(loc) if not (i >= 2 and i % 2 == 0 and p in ("dict", "list")))
    if len(loc) > 10:
        loc = loc[:5] + ("...",) + loc[-3:]
    out = ""
    for part in loc:
        if part == "...":
            out += "..."
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.match(str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{part!r}]"
    return out


def _message(err: dict) -> tuple[str, str]:
    """(location, message) of one pydantic error in allocmoe's words."""
    loc, kind, ctx = tuple(err["loc"]), err["type"], err.get("ctx") or {}
    if kind == "missing" and loc:
        where = _loc(loc[:-1])
        return where, f"has no {str(loc[-1])!r} field"
    words = {
        "dict_type": "must be an object", "model_type": "must be an object", "model_attributes_type": "must be an object",
        "list_type": "must be a list", "string_type": "must be a string", "int_type": "must be an integer",
        "float_type": "must be a number", "finite_number": "must be a finite number", "bool_type": "must be true or false",
        "invalid-json-value": "must be a JSON value", "recursion_loop": "is nested too deeply",
        "recursion_depth_exceeded": "is nested too deeply",
    }
    if kind == "too_short":
        msg = "must not be empty" if ctx.get("min_length", 1) <= 1 else f"must have at least {ctx['min_length']} items"
    elif kind in words:
        msg = words[kind]
    else:  # our own messages (already with the value), else pydantic's
        return _loc(loc), err["msg"]
    if "input" in err and not kind.startswith("recursion"):
        msg += f", got {_show(err['input'])}"
    return _loc(loc), msg


def _one_line(e: ValidationError, source: str) -> str:
    errs = e.errors(include_url=False)
    where, msg = _message(errs[0])
    more = len(errs) - 1
    text = f"{source}: {where}: {msg}" if where else f"{source}: {msg}"
    if more:
        text += f" (and {more} more problem{'s' if more > 1 else ''})"
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _parse(model: type[BaseModel], d: Any, source: str, what: str, fmt: str, versions: tuple, error: type,
           context: dict | None = None):
    if not isinstance(d, dict):
        raise error(f"{source} is not a JSON object (an allocmoe {what} is one), got {type(d).__name__}")
    if d.get("format") != fmt:
        raise error(f"{source} is not an allocmoe {what} (format is {_show(d.get('format'))}, expected {fmt!r})")
    v = d.get("version")
    if type(v) is not int or v not in versions:
        raise error(f"{source} has unknown {what} version {_show(v)} (this allocmoe reads version "
                    f"{', '.join(map(str, versions))})")
    try:
        return model.model_validate(d, context=context)
    except ValidationError as e:
        raise error(_one_line(e, source)) from None
    except RecursionError:
        raise error(f"{source} is nested too deeply") from None


def parse_plan(d: Any, source: str = "plan", *, require_knobs: bool = True) -> PlanFile:
    """Check plan JSON (a dict) against the plan schema; `PlanError` (one line, naming the field) if it fails.

    `require_knobs=False` accepts a calibrated token policy whose knob is not there yet (a plan being made)."""
    return _parse(PlanFile, d, source, "plan", PLAN_FORMAT, PLAN_VERSIONS, PlanError,
                  context={"require_knobs": require_knobs})


def parse_profile(d: Any, source: str = "profile") -> ProfileFile:
    """Check profile JSON (a dict) against the profile schema; `ProfileError` (one line) if it fails."""
    return _parse(ProfileFile, d, source, "profile", PROFILE_FORMAT, PROFILE_VERSIONS, ProfileError)


# --------------------------------------------------------------------------------------------------
# a plan's compensation file


def producible_counts(k: int, original_k: int, token_policy: dict) -> set[int]:
    """Kept counts c (1 <= c < original_k: something dropped) a layer at `k` can give a token under the
    token policy (what patching runs: fixed policies exactly k; others between min_k and their candidate
    width, max_k or max(original_k, k))."""
    pol = TOKEN_POLICIES.lookup(token_policy.get("name"))
    if pol.exact:
        cs = {k}
    else:
        width = max(token_policy.get("max_k") or max(original_k, k), k)
        cs = set(range(int(token_policy.get("min_k", 1)), width + 1))
    return {c for c in cs if 1 <= c < original_k}


def check_compensation_maps(ks: list[int], original_ks: list[int], token_policy: dict, counts: list[list[int]],
                            top_k: list[int], recorded_plan: Any = None, source: str = "compensation file") -> None:
    """Refuse compensation maps that were fitted for another plan: their layers (count and original top-k)
    must be the plan's, every kept count they hold one the plan's token policy can produce, and the plan
    recorded in the file (if any) the same allocation. `counts[l]`: the kept counts with a map in layer l."""
    if len(counts) != len(ks) or list(top_k) != list(original_ks):
        raise PlanError(f"{source} has maps for {len(counts)} MoE layers with top-k {list(top_k)}, but the plan has "
                        f"{len(ks)} with top-k {list(original_ks)}: it belongs to another plan or model")
    name = token_policy.get("name")
    for l, (k, K, cs) in enumerate(zip(ks, original_ks, counts)):
        allowed = producible_counts(k, K, token_policy)
        bad = sorted(set(cs) - allowed)
        if bad:
            can = f"only {sorted(allowed)}" if allowed else "none (nothing is dropped)"
            raise PlanError(f"{source}: layer {l} has a map for {bad[0]} kept experts, but at k={k} the plan's "
                            f"{name} policy keeps {can}: the file belongs to another plan")
    if isinstance(recorded_plan, dict) and "ks" in recorded_plan and list(recorded_plan["ks"]) != list(ks):
        raise PlanError(f"{source} was fitted for a plan with k={list(recorded_plan['ks'])}, but this plan has "
                        f"k={list(ks)}: the file belongs to another plan")
    rec_pol = recorded_plan.get("token_policy") if isinstance(recorded_plan, dict) else None
    if isinstance(rec_pol, dict) and rec_pol.get("name") != name:
        raise PlanError(f"{source} was fitted under token policy {rec_pol.get('name')!r}, but this plan uses "
                        f"{name!r}: the file belongs to another plan")

