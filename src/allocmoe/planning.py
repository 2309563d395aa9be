"""Plan-making in one call: a model (or a profile) and a recipe or budget in, a validated `Plan` out.

    plan = allocmoe.allocate(model, budget=0.5, tokenizer=tok)                      # Alloc-L (profiles first)
    plan = allocmoe.allocate(model, budget=0.5, token_policy="global", tokenizer=tok, profile="p.json")
    plan = allocmoe.allocate(model, budget=24, method="uniform")                     # no text needed
    plan = allocmoe.allocate(profile, 0.5)                                           # profile only (dp/greedy)
    plan = allocmoe.allocate(model, recipe, tokenizer=tok)                           # a Recipe (recipe.py)
    again = allocmoe.allocate(model, Recipe.from_dict(plan.meta["recipe"]), tokenizer=tok)   # the same plan

The keyword form builds a `Recipe` (recipe.py: method, token policy, compensation, data); keywords given
with a recipe override its fields. What is needed is derived by the recipe from the registries: a method
with `needs_profile` gets `profile` or profiles the model on the calibration text; a calibrated token
policy is tuned on the same text. Text comes from `windows` (token ids [N, seq_len]), or `texts` +
`tokenizer`, or the recipe's calibration files (default: the built-in calibration split) + `tokenizer`.
The plan stores the recipe, with fingerprints of the text and profile it used, in `meta["recipe"]`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from . import allocators
from ._version import __version__
from .adapters import find_moe_layers
from .data import fingerprint_tokens
from .errors import BudgetError, SettingsError
from .methods import AllocationContext, get_method
from .plan import Plan, check_fingerprint, fingerprint
from .policies import get_policy
from .profiling import Profile
from .recipe import CALIBRATION_TOKENS, SEQ_LEN, Recipe, configured_method


def calibration_windows(tokenizer=None, texts: list[str] | None = None,
                        windows: torch.Tensor | None = None, tokens: int = CALIBRATION_TOKENS,
                        seq_len: int = SEQ_LEN, what: str = "this plan",
                        files: list[str] | None = None) -> torch.Tensor:
    """Token windows for profiling/calibration: `windows` as given, else `texts` (default: the text files
    `files`, else the built-in calibration split) tokenized into windows of `seq_len`, at most `tokens`."""
    if windows is not None:
        return windows
    from .data import read_texts, token_windows

    if tokenizer is None:
        raise SettingsError(f"{what} needs calibration text: pass windows=, or tokenizer= (and texts=)",
                            param="tokenizer")
    if texts is None:
        texts, names = read_texts(files, "calibration")
        key = (tuple(names), tuple(os.stat(n).st_mtime_ns for n in names), tokens, seq_len)
        hit = _windows_cache.get(key)
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
        w = token_windows(tokenizer, texts, seq_len, tokens, name=names[0] if len(names) == 1 else "calibration text")
        while len(_windows_cache) >= 2:  # two entries: the main job's calibration windows and the guard's text
            _windows_cache.pop(next(iter(_windows_cache)))
        _windows_cache[key] = (tokenizer, w)
        return w
    if isinstance(texts, str):
        texts = [texts]
    return token_windows(tokenizer, list(texts), seq_len, tokens)


# (files, mtimes, tokens, seq_len) -> (tokenizer, windows); the tokenizer is held so its id cannot be reused
_windows_cache: dict[tuple, tuple] = {}


def _recipe_windows(r: Recipe, tokenizer, texts, windows, what: str) -> tuple[torch.Tensor, dict]:
    """The recipe's calibration windows and what the recipe should record about them."""
    d = r.data
    given = windows is not None or texts is not None
    if not given and d.given:
        raise SettingsError("this recipe's calibration text was passed in (texts= or windows=), not read from "
                            "files: pass the same text again", param="texts")
    w = calibration_windows(tokenizer, texts, windows, d.calibration_tokens, d.seq_len, what=what, files=d.files)
    fp = fingerprint_tokens(w)
    if d.fingerprint is not None and fp != d.fingerprint:
        raise SettingsError(f"the calibration text differs from the recipe's (token fingerprint {fp}, the recipe "
                            f"records {d.fingerprint}); pass the text it was made with, or drop data.fingerprint",
                            param="texts")
    if d.fingerprint is not None:  # the recipe's own text (read again, or passed in): described as the recipe has it
        return w, {"given": d.given, "fingerprint": fp, "files": d.files}
    return w, {"given": given, "fingerprint": fp, "files": None if given else d.files}


def allocate(source, budget=None, method: str | None = None, *, recipe: Recipe | dict | None = None,
             model: nn.Module | None = None, tokenizer=None, texts: list[str] | None = None,
             windows: torch.Tensor | None = None, profile: "Profile | str | os.PathLike | dict | None" = None,
             progress: bool = True, guard_windows: torch.Tensor | None = None, **settings) -> Plan:
    """A plan meeting the budget (a fraction like 0.5, or an integer number of activations per token).

    `source` is the model (preferred) or a profile (Profile, dict or path; enough for dp/greedy). The second
    argument is the budget or a `Recipe` (also `recipe=`, a Recipe or its dict). `settings` are the
    recipe's keywords (recipe.KEYWORDS: token_policy, renormalize, seed, calibration_tokens, seq_len, k_from,
    metric, compensate, compensation_rank, compensation_ridge, method_options, compensation_options, ...);
    given with a recipe they override its fields. `compensate=True` also fits dropped-expert compensation on
    the calibration text: the plan then carries the maps, and `plan.save(path)` writes them beside the JSON.

    A method that scores plans (dp, greedy, lexi, search) is guarded (guard.py, recipe `guard=False` turns it
    off): its allocation is kept only if it beats uniform (and the profile's previous round) on held-out
    calibration windows, `guard_windows` or the end of the calibration text; `meta["guard"]` has the figures.
    """
    if isinstance(budget, Recipe):
        if recipe is not None:
            raise SettingsError("pass the recipe once: as the second argument or as recipe=", param="recipe")
        recipe, budget = budget, None
    if isinstance(recipe, dict):
        recipe = Recipe.from_dict(recipe)
    if recipe is not None and not isinstance(recipe, Recipe):
        raise SettingsError(f"recipe must be a Recipe or its dict, got {type(recipe).__name__}", param="recipe")
    kw = dict(settings, method=method)
    if budget is not None:
        kw["budget"] = budget
    r = (recipe or Recipe()).updated(**kw)
    if r.budget is None:
        raise SettingsError("pass a budget: a fraction like 0.5 or an integer number of activations per token",
                            param="budget")
    if isinstance(source, nn.Module):
        if model is not None and model is not source:
            raise SettingsError("two models: pass the model once (first argument), not also as model=",
                                param="model")
        model = source
    elif source is not None:
        if profile is not None and profile is not source:
            raise SettingsError("two profiles: pass the profile as the first argument or as profile=, not both",
                                param="profile")
        profile = source
    if profile is None and r.data.profile:
        profile = r.data.profile  # the profile file the recipe was made with
    prof = Profile.load(profile) if profile is not None else None
    needs = r.needs(have_profile=prof is not None)
    if model is None and needs.model:
        raise SettingsError(f"{needs.why} needs the model: call allocate(model, ...)", param="model")
    pol = get_policy(r.token_policy.name)
    data: dict = {}
    caller_windows = windows is not None and texts is None  # token ids passed in: no text to hold out from
    if needs.text:
        windows, wdata = _recipe_windows(r, tokenizer, texts, windows,
                                         what=f"method {r.method.name!r} with token policy {pol.name!r}")
        data.update(wdata)
    if needs.profiling:
        from .profiling import profile as run_profile

        # at the budget's operating point (the other layers at its allocation) unless the recipe says "full"
        prof = run_profile(model, windows, k_from=r.method.k_from, renormalize=r.token_policy.renormalize,
                           progress=progress, at=r.budget if r.method.profile_at == "budget" else "full")
    if prof is not None:  # the methods read it (dp, greedy; the search starts from its dp plan), and its k values
        pfp = (prof.data or {}).get("fingerprint")
        if r.data.profile_fingerprint is not None and pfp != r.data.profile_fingerprint:
            raise SettingsError(f"the profile differs from the recipe's (made on calibration tokens {pfp}, the "
                                f"recipe records {r.data.profile_fingerprint}): pass the profile it was made "
                                "with", param="profile")
        data.update(profile=str(profile) if isinstance(profile, (str, os.PathLike)) else None,
                    profile_fingerprint=pfp)
        if r.method.metric:
            prof = prof.with_metric(r.method.metric)

    guarded = r.method.guard and get_method(r.method.name).guarded
    held_out = None  # the guard's held-out windows (or why there are none); compensation selects on them too
    if guarded or r.compensation.enabled:
        held_out = _guard_windows(r, model, tokenizer, texts, None if caller_windows else windows, prof,
                                  guard_windows, caller_windows)
    plan = _allocation(r, model, prof, windows, progress, held_out if guarded else None)
    if pol.calibrated:
        from .calibration import calibrate

        plan = calibrate(model, plan, windows, progress=progress)
    made = r.with_data(**data)
    plan.meta["recipe"] = made.to_dict()
    if r.compensation.enabled:
        plan = _compensate(model, plan, made, windows, progress,
                           held_out if isinstance(held_out, torch.Tensor) else None)
    plan.meta["created_with"] = f"allocmoe {__version__}"
    return plan


def _guard_windows(r: Recipe, model, tokenizer, texts, windows, prof: Profile | None,
                   given: torch.Tensor | None, caller_windows: bool) -> "torch.Tensor | str":
    """Held-out calibration windows for the guard (guard.py), or why there are none: `given`, else the last
    GUARD_TOKENS tokens of the calibration text when they lie beyond every window read for profiling and
    calibration (counted from the start of the same text)."""
    from .guard import GUARD_TOKENS, has_weights, held_out_windows

    if not has_weights(model):
        return "skipped: no model weights (pass the model)"
    if given is not None:
        return given
    if caller_windows:
        return "skipped: the calibration windows were passed in, not text (pass guard_windows=)"
    if tokenizer is None:
        return "skipped: no tokenizer to read held-out calibration text (pass guard_windows=)"
    seq = r.data.seq_len
    used = max(r.data.calibration_tokens // seq, 0 if windows is None else int(windows.shape[0]),
               int((prof.settings if prof is not None else {}).get("windows", 0)))
    all_w = calibration_windows(tokenizer, texts, None, tokens=10**12, seq_len=seq, files=r.data.files)
    held = held_out_windows(all_w, used, GUARD_TOKENS)
    return held if held is not None else (f"skipped: the calibration text ({all_w.shape[0]} windows) has no "
                                          f"{GUARD_TOKENS} tokens beyond the {used} windows read")


def _allocation(r: Recipe, model, prof: Profile | None, windows, progress: bool, guard_w=None) -> Plan:
    """The recipe's method run on the model or profile: a validated plan, before calibration/compensation;
    checked by the guard on `guard_w` (held-out windows, or a string saying why the guard was skipped)."""
    meth = configured_method(r.method.name, r.method.options)
    pol = get_policy(r.token_policy.name)
    if prof is not None:
        fp = prof.model
        if model is not None:
            check_fingerprint(fp, fingerprint(find_moe_layers(model), model), what="profile")
        k_values = prof.k_values
    else:
        layers = find_moe_layers(model)
        fp = fingerprint(layers, model)
        k_values = list(range(r.method.k_from, max(l.top_k for l in layers) + 1))
    L = fp["num_moe_layers"]
    K = fp["top_k"] if isinstance(fp["top_k"], int) else max(fp["top_k"])
    B = allocators.parse_budget(r.budget, L, K, min(k_values), max(k_values))

    tp = r.token_policy.as_plan_policy()
    # methods that score whole plans see the policy with the widest defaults the plan could get
    ctx = AllocationContext(budget=B, k_values=k_values, num_layers=L, profile=prof, model=model,
                            windows=windows, seed=r.method.seed, progress=progress,
                            token_policy={**pol.defaults(k_values, K), **tp},
                            meta={"budget_requested": str(r.budget)})
    ks = meth.allocate(ctx)
    if isinstance(guard_w, str):
        ctx.meta["guard"] = {"chosen": "candidate", "note": guard_w}
    elif guard_w is not None:
        from .guard import guard

        try:
            uni = allocators.uniform_allocate(L, k_values, B)
        except BudgetError:
            uni = None
        if uni is None:
            ctx.meta["guard"] = {"chosen": "candidate", "note": "skipped: no uniform allocation meets this budget"}
        else:
            prev = (getattr(prof, "operating_point", None) or {}).get("around") if prof is not None else None
            ks, ctx.meta["guard"] = guard(model, ks, uni, guard_w, ctx.token_policy, previous=prev)
    for key, value in pol.defaults(ks, K).items():
        tp.setdefault(key, value)
    plan = Plan(layers=[{"k": int(k), "name": n} for k, n in zip(ks, fp.get("moe_layer_names") or [""] * L)],
                model=fp, token_policy=tp, renormalize=r.token_policy.renormalize, method=r.method.name,
                meta=ctx.meta)
    plan.budget = plan.compute_budget()
    plan.validate()
    return plan


def _compensate(model: nn.Module, plan: Plan, r: Recipe, windows: torch.Tensor, progress: bool,
                held: torch.Tensor | None = None) -> Plan:
    """A copy of `plan` with compensation fitted per the recipe's settings; meta["recipe"] records `r` with
    the ridge the fitter used. `held`: held-out calibration windows (the guard's) on which the fitting mode
    and the maps kept are chosen, so all of `windows` is fitted on; None: the last eighth of `windows`."""
    from .compensation_fit import fit_best

    c = r.compensation
    kw = dict(c.options)
    if c.ridge is not None:
        kw["ridge"] = c.ridge
    out = Plan.from_dict(plan.to_dict())
    if held is not None:
        kw.setdefault("holdout", held)
    comp = fit_best(model, out, windows, rank=c.rank, progress=progress, **kw)
    out.compensation_maps, out.compensation = comp, comp.summary()
    if c.ridge is None and "ridges" not in c.options and isinstance(comp.meta.get("ridge"), (int, float)):
        r = Recipe.from_dict({**r.to_dict(), "compensation": {**r.to_dict()["compensation"],
                                                              "ridge": float(comp.meta["ridge"])}})
    out.meta["recipe"] = r.updated(compensate=True).to_dict()
    return out


def add_compensation(model: nn.Module, plan: Plan, *, tokenizer=None, texts: list[str] | None = None,
                     windows: torch.Tensor | None = None, rank: int | str | None = None,
                     calibration_tokens: int | None = None, seq_len: int | None = None, progress: bool = True,
                     ridge: float | None = None, options: dict | None = None) -> Plan:
    """A copy of `plan` with dropped-expert compensation fitted on calibration text (compensation_fit.py): both
    fitting modes (the full model's states, and layer by layer on the budgeted model's own states), the
    one with the lower KL on held-out calibration windows kept.

    Settings left None come from the plan's recipe (meta["recipe"]) when it has one, else the defaults; the
    text is the recipe's calibration text unless `texts`/`windows` are given. The copy's recipe then says
    compensation was fitted (or is dropped, when the text differs from the text the plan was made on)."""
    stored = plan.meta.get("recipe")
    base = Recipe.from_dict(stored) if isinstance(stored, dict) else Recipe()
    r = base.updated(compensate=True, compensation_rank=rank, compensation_ridge=ridge,
                     compensation_options=options, calibration_tokens=calibration_tokens, seq_len=seq_len)
    given = windows is not None or texts is not None
    if given and r.data.fingerprint is None:
        r = r.with_data(given=True)  # recorded as passed-in text, so it is checked when the recipe is re-made
    try:
        w, wdata = _recipe_windows(r, tokenizer, texts, windows, what="compensation")
    except SettingsError:
        if not given:
            raise
        # other text than the plan's own: compensate on it, but no single recipe re-makes the result
        w = calibration_windows(tokenizer, texts, windows, r.data.calibration_tokens, r.data.seq_len,
                                what="compensation")
        out = _compensate(model, plan, r.with_data(fingerprint=None), w, progress,
                          _held_for_compensation(r, model, tokenizer, texts, windows, w))
        out.meta.pop("recipe", None)
        out.meta["recipe_note"] = "compensation was fitted on other text than the plan; no recipe re-makes it"
        return out
    return _compensate(model, plan, r.with_data(**wdata), w, progress,
                       _held_for_compensation(r, model, tokenizer, texts, windows, w))


def _held_for_compensation(r: Recipe, model, tokenizer, texts, windows, w) -> torch.Tensor | None:
    """The guard's held-out calibration windows beyond `w`, or None (then fit_best holds out `w`'s end)."""
    caller_windows = windows is not None and texts is None
    held = _guard_windows(r, model, tokenizer, texts, None if caller_windows else w, None, None, caller_windows)
    return held if isinstance(held, torch.Tensor) else None
