"""A recipe for plan-making: what `allocate` does, as one small serialisable object.

    recipe = Recipe.from_keywords(budget=0.5, method="dp", token_policy="global", compensate=True)
    plan = allocmoe.allocate(model, recipe, tokenizer=tok)
    again = allocmoe.allocate(model, Recipe.from_dict(plan.meta["recipe"]), tokenizer=tok)   # the same plan

Four concerns, one small dataclass each (in the spirit of torchao's `quantize_(model, config)` and
llm-compressor's recipes):

- `method`       how the per-layer counts are chosen: a registered method (methods.py), its seed, the
                 smallest candidate k, the profile matrix it reads, and the method's own settings
                 (`options`: the search's generations, offspring, ...);
- `token_policy` how each token's count is chosen (policies.py), its parameters, and how the kept
                 experts are weighted (`renormalize`);
- `compensation` whether dropped-expert compensation is fitted, its rank and ridge, and further fitting
                 settings (`options`, passed to compensation's `fit_best`);
- `data`         the calibration text (files, or the built-in calibration split), how many tokens, the
                 window length, and, once a plan is made, fingerprints of the text and profile it used.

What a recipe needs (the model, calibration text, a profile) is derived here, once, from the method and
policy registries (`Recipe.needs`); `allocate`, the CLI and the main job all ask it. A plan records the
recipe it was made with in `plan.meta["recipe"]` (`to_dict`); `from_dict` validates one, with a one-line
`SettingsError` naming the bad field.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass, field, fields, replace
from decimal import Decimal, InvalidOperation
from typing import Any

from .errors import BudgetError, PlanError, SettingsError
from .methods import AllocationMethod, get_method
from .policies import get_policy

RECIPE_VERSION = 1
#: calibration tokens when none are given: profiling, calibrated token policies, compensation, the search
CALIBRATION_TOKENS = 16384
SEQ_LEN = 256
# a fraction of 10**6 or more can meet no model's budget (it is at most the number of experts over the top-k)
_MAX_FRACTION_DIGITS = 6
_BUDGET_HINT = "give a fraction of the original budget like 0.5, or an integer number of activations per token"


def check_budget(budget: Any) -> int | float | str:
    """`budget` as given, after checking it is a positive, finite number of sane size (the model decides
    later whether it is feasible). A one-line BudgetError otherwise, never an arithmetic overflow. Numpy
    numbers come back as Python ones (a recipe is JSON)."""
    if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):
        budget = int(budget)
    elif isinstance(budget, numbers.Real) and not isinstance(budget, (bool, int)):
        budget = float(budget)
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise BudgetError(f"budget {budget!r} is not a number; {_BUDGET_HINT}", param="budget")
    raw = budget.strip() if isinstance(budget, str) else budget
    shown = str(raw) if len(str(raw)) <= 24 else str(raw)[:24] + "..."
    if isinstance(raw, str) and re.fullmatch(r"[+]?\d+", raw):
        if len(raw.lstrip("+0")) > 12:  # an integer this long is no activation count (and int() refuses 4300 digits)
            raise BudgetError(f"budget {shown} is far too large; {_BUDGET_HINT}", param="budget")
        if int(raw) == 0:
            raise BudgetError(f"budget {shown} is not positive; {_BUDGET_HINT}", param="budget")
        return raw
    if isinstance(raw, int):
        value = Decimal(raw)
    else:
        try:
            value = Decimal(repr(raw) if isinstance(raw, float) else raw)
        except (InvalidOperation, ValueError):
            raise BudgetError(f"budget {shown!r} is not a number; {_BUDGET_HINT}", param="budget") from None
    if value.is_nan():
        raise BudgetError(f"budget is NaN; {_BUDGET_HINT}", param="budget")
    if value.is_infinite():
        raise BudgetError(f"budget {shown} is not finite; {_BUDGET_HINT}", param="budget")
    if value <= 0:
        raise BudgetError(f"budget {shown} is not positive; {_BUDGET_HINT}", param="budget")
    if not isinstance(raw, int) and value.adjusted() >= _MAX_FRACTION_DIGITS:
        raise BudgetError(f"budget {shown} is far too large; {_BUDGET_HINT}", param="budget")
    return raw


def method_options(method: str | AllocationMethod) -> dict[str, Any]:
    """The settings a method exposes (its public scalar class attributes beyond the method interface) and
    their defaults: e.g. the search's generations, offspring, low_windows, high_windows."""
    m = get_method(method) if isinstance(method, str) else method
    base = set(dir(AllocationMethod))
    return {k: getattr(m, k) for k in dir(type(m)) if not k.startswith("_") and k not in base
            and isinstance(getattr(type(m), k), (bool, int, float, str))}


def configured_method(name: str, options: dict) -> AllocationMethod:
    """The registered method `name` with `options` applied to a copy (the registered one is untouched)."""
    import copy

    meth = get_method(name)
    if not options:
        return meth
    meth = copy.copy(meth)
    for k, v in options.items():
        setattr(meth, k, v)
    return meth


def _fail(field_name: str, message: str):
    raise SettingsError(f"recipe field {field_name}: {message}", param=field_name.split(".")[-1])


def _int(name: str, v, lo: int | None = None):
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(name, f"expected an integer, got {v!r}")
    if lo is not None and v < lo:
        _fail(name, f"must be at least {lo}, got {v}")
    return v


def _scalars(name: str, d) -> dict:
    if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
        _fail(name, f"expected an object with string keys, got {d!r}")
    for k, v in d.items():
        ok = v is None or isinstance(v, (bool, int, float, str)) or (
            isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v))
        if not ok:
            _fail(f"{name}.{k}", f"expected a number, string or list of them, got {v!r}")
    return dict(d)


@dataclass(frozen=True)
class MethodSpec:
    name: str = "dp"
    seed: int = 0
    k_from: int = 1  # the smallest candidate k per layer (not a token policy's per-token min_k)
    metric: str | None = None  # the profile matrix dp/greedy/search read (None: the profile's own metric)
    options: dict = field(default_factory=dict)  # the method's own settings (`method_options`)
    # where a profile made inline is measured: "budget" (the other layers at the budget's allocation,
    # operating_point.py) or "full" (every other layer at full K)
    profile_at: str = "budget"
    # a method that scores plans (dp, greedy, lexi, search) must beat uniform on held-out text (guard.py)
    guard: bool = True

    def validate(self) -> None:
        if not isinstance(self.name, str):
            _fail("method.name", f"expected a string, got {self.name!r}")
        get_method(self.name)
        _int("method.seed", self.seed)
        _int("method.k_from", self.k_from, 1)
        if self.metric is not None and self.metric not in ("kl", "loss"):
            _fail("method.metric", f"choose kl or loss, got {self.metric!r}")
        if self.profile_at not in ("budget", "full"):
            _fail("method.profile_at", f"choose budget or full, got {self.profile_at!r}")
        if not isinstance(self.guard, bool):
            _fail("method.guard", f"expected true or false, got {self.guard!r}")
        known = method_options(self.name)
        for k, v in _scalars("method.options", self.options).items():
            if k not in known:
                _fail(f"method.options.{k}", f"method {self.name!r} has no such setting (it has: "
                      f"{', '.join(sorted(known)) or 'none'})")
            if type(v) is not type(known[k]) and not (isinstance(known[k], float) and isinstance(v, int)):
                _fail(f"method.options.{k}", f"expected {type(known[k]).__name__}, got {v!r}")
            if isinstance(v, int) and not isinstance(v, bool) and v < 1:
                _fail(f"method.options.{k}", f"must be at least 1, got {v}")


@dataclass(frozen=True)
class TokenPolicySpec:
    name: str = "fixed"
    params: dict = field(default_factory=dict)  # min_k, max_k, the policy's knob (the rest: its defaults)
    renormalize: str = "native"

    def validate(self) -> None:
        from .plan import RENORM_MODES

        if not isinstance(self.name, str):
            _fail("token_policy.name", f"expected a string, got {self.name!r}")
        try:
            get_policy(self.name)
        except PlanError as e:  # the policy table's own error type; a recipe's are SettingsErrors
            raise SettingsError(str(e), param="token_policy") from None
        params = _scalars("token_policy.params", self.params)
        if "name" in params:
            _fail("token_policy.params.name", "the policy is named by token_policy.name")
        for k in ("min_k", "max_k"):
            if params.get(k) is not None:
                _int(f"token_policy.params.{k}", params[k], 1)
        if self.renormalize not in RENORM_MODES:
            _fail("token_policy.renormalize", f"choose {', '.join(RENORM_MODES)}, got {self.renormalize!r}")

    def as_plan_policy(self) -> dict:
        """The plan's `token_policy` before the policy's defaults are filled in."""
        return {"name": self.name, **{k: v for k, v in self.params.items() if v is not None}}


@dataclass(frozen=True)
class CompensationSpec:
    enabled: bool = False
    rank: int | str = "auto"  # "auto" (largest within the FLOPs cap) or an integer
    ridge: float | None = None  # relative ridge of the fit (None: the fitter's default; a made plan records it)
    options: dict = field(default_factory=dict)  # further keywords of compensation's fit_best

    def validate(self) -> None:
        if not isinstance(self.enabled, bool):
            _fail("compensation.enabled", f"expected true or false, got {self.enabled!r}")
        if self.rank != "auto":
            _int("compensation.rank", self.rank, 1)
        if self.ridge is not None and (isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float))
                                       or not self.ridge >= 0 or math.isinf(self.ridge)):
            _fail("compensation.ridge", f"expected a finite number >= 0, got {self.ridge!r}")
        opts = _scalars("compensation.options", self.options)
        for k in ("rank", "ridge", "progress", "windows", "model", "plan"):
            if k in opts:
                _fail(f"compensation.options.{k}", "not settable here" + (
                    f" (use compensation.{k})" if k in ("rank", "ridge") else ""))


@dataclass(frozen=True)
class DataSpec:
    calibration_tokens: int = CALIBRATION_TOKENS
    seq_len: int = SEQ_LEN
    files: list | None = None  # calibration text files; None: the built-in calibration split
    given: bool = False  # the text was handed to allocate (texts= / windows=), not read from `files`
    fingerprint: str | None = None  # of the calibration token windows used (recorded when a plan is made)
    profile: str | None = None  # the profile file read (None: none needed, profiled inline, or given in memory)
    profile_fingerprint: str | None = None  # of the profile's own calibration tokens

    def validate(self) -> None:
        _int("data.calibration_tokens", self.calibration_tokens, 1)
        _int("data.seq_len", self.seq_len, 2)
        if self.calibration_tokens < self.seq_len:
            _fail("data.calibration_tokens", f"must be at least one window (seq_len {self.seq_len}), got "
                  f"{self.calibration_tokens}")
        if self.files is not None and (not isinstance(self.files, (list, tuple)) or not self.files
                                       or not all(isinstance(f, str) for f in self.files)):
            _fail("data.files", f"expected a non-empty list of file names or null, got {self.files!r}")
        if not isinstance(self.given, bool):
            _fail("data.given", f"expected true or false, got {self.given!r}")
        for k in ("fingerprint", "profile", "profile_fingerprint"):
            if getattr(self, k) is not None and not isinstance(getattr(self, k), str):
                _fail(f"data.{k}", f"expected a string or null, got {getattr(self, k)!r}")


@dataclass(frozen=True)
class Needs:
    """What making a plan from a recipe takes. `why`: the first reason the model is needed (for errors)."""

    model: bool
    text: bool
    profiling: bool  # the method reads a profile and none was given: profile on the calibration text
    why: str | None


_SECTIONS = {"method": MethodSpec, "token_policy": TokenPolicySpec, "compensation": CompensationSpec,
             "data": DataSpec}
# the keyword form of `allocate` -> (section, field)
KEYWORDS = {
    "method": ("method", "name"), "seed": ("method", "seed"), "k_from": ("method", "k_from"),
    "k_min": ("method", "k_from"),  # the old spelling of k_from, still accepted
    "metric": ("method", "metric"), "method_options": ("method", "options"),
    "profile_at": ("method", "profile_at"), "guard": ("method", "guard"),
    "renormalize": ("token_policy", "renormalize"),
    "compensate": ("compensation", "enabled"), "compensation_rank": ("compensation", "rank"),
    "compensation_ridge": ("compensation", "ridge"), "compensation_options": ("compensation", "options"),
    "calibration_tokens": ("data", "calibration_tokens"), "seq_len": ("data", "seq_len"),
    "calibration_files": ("data", "files"),
}


@dataclass(frozen=True)
class Recipe:
    budget: int | float | str | None = None
    method: MethodSpec = field(default_factory=MethodSpec)
    token_policy: TokenPolicySpec = field(default_factory=TokenPolicySpec)
    compensation: CompensationSpec = field(default_factory=CompensationSpec)
    data: DataSpec = field(default_factory=DataSpec)

    # ---- building

    @classmethod
    def from_keywords(cls, **keywords) -> "Recipe":
        """A recipe from `allocate`'s keyword form (budget, method, token_policy, seed, compensate, ...)."""
        return cls().updated(**keywords)

    def updated(self, **keywords) -> "Recipe":
        """A copy with `allocate`'s keywords applied on top (None leaves a field as it is, except budget).
        `token_policy` is a name or a dict with `name` and parameters (which then replace the params)."""
        out = {s: {} for s in _SECTIONS}
        top = {}
        for k, v in keywords.items():
            if k == "budget":
                top["budget"] = None if v is None else check_budget(v)
            elif k == "token_policy":
                if v is None:
                    continue
                if isinstance(v, dict):
                    if "name" not in v:
                        raise SettingsError("token_policy as a dict needs a 'name'", param="token_policy")
                    out["token_policy"].update(name=v["name"], params={a: b for a, b in v.items() if a != "name"})
                elif v != self.token_policy.name:
                    out["token_policy"].update(name=v, params={})
            elif k in KEYWORDS:
                if v is not None:
                    section, name = KEYWORDS[k]
                    out[section][name] = list(v) if name == "files" else v
            else:
                raise SettingsError(f"unknown setting {k!r} (known: budget, token_policy, "
                                    f"{', '.join(KEYWORDS)})", param=k)
        r = replace(self, **top, **{s: replace(getattr(self, s), **kw) for s, kw in out.items() if kw})
        r.validate()
        return r

    def with_data(self, **changes) -> "Recipe":
        return replace(self, data=replace(self.data, **changes))

    # ---- (de)serialising

    def validate(self) -> "Recipe":
        if self.budget is not None:
            check_budget(self.budget)
        for s in _SECTIONS:
            getattr(self, s).validate()
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["data"]["files"] = list(self.data.files) if self.data.files is not None else None
        return {"version": RECIPE_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """A validated recipe from `to_dict`'s form (as stored in a plan's meta["recipe"] or a JSON file)."""
        if not isinstance(d, dict):
            raise SettingsError(f"a recipe must be a JSON object, got {type(d).__name__}", param="recipe")
        version = d.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise SettingsError(f"recipe version {version!r} is not supported (this allocmoe reads version "
                                f"{RECIPE_VERSION})", param="recipe")
        unknown = set(d) - {"version", "budget", *_SECTIONS}
        if unknown:
            _fail(sorted(unknown)[0], f"unknown field (known: budget, {', '.join(_SECTIONS)})")
        parts = {}
        for s, typ in _SECTIONS.items():
            sub = d.get(s, {})
            if not isinstance(sub, dict):
                _fail(s, f"expected an object, got {sub!r}")
            names = {f.name for f in fields(typ)}
            bad = set(sub) - names
            if bad:
                _fail(f"{s}.{sorted(bad)[0]}", f"unknown field (known: {', '.join(sorted(names))})")
            parts[s] = typ(**sub)
        return cls(budget=d.get("budget"), **parts).validate()

    # ---- what it takes

    def needs(self, have_profile: bool = False) -> Needs:
        """What making this recipe's plan takes, given whether a profile is at hand (derived from the method
        and policy registries; the one place `allocate`, the CLI and the main job learn it)."""
        meth, pol = get_method(self.method.name), get_policy(self.token_policy.name)
        profiling = meth.needs_profile and not have_profile
        reasons = [("profiling", profiling), (f"method {meth.name!r}", meth.needs_model or meth.needs_windows),
                   (f"token policy {pol.name!r}", pol.calibrated), ("compensation", self.compensation.enabled)]
        why = next((r for r, on in reasons if on), None)
        text = profiling or meth.needs_windows or pol.calibrated or self.compensation.enabled
        return Needs(model=why is not None, text=text, profiling=profiling, why=why)

    @property
    def needs_profile(self) -> bool:
        """The method reads a profile (given, or made on the calibration text)."""
        return get_method(self.method.name).needs_profile

    @property
    def needs_model(self) -> bool:
        """The model's weights are needed even when a profile is given."""
        return self.needs(have_profile=True).model
