"""The plan and profile file schemas (schema.py): every finding of issue 22 part 2 refused with one line, files
that load today still load, and property tests: arbitrary JSON and mutated valid files fed to both loaders
either load (and then apply / allocate without a traceback) or raise one AllocMoeError subclass."""

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import allocmoe
from allocmoe import errors, schema
from allocmoe.plan import Plan
from allocmoe.profiling import Profile
from allocmoe.testing import tiny_model

DOCS = Path(__file__).resolve().parents[1] / "docs"
ONE_CORE = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# cases the property tests below try per run (their max_examples): 2950 documents, 3650 loader calls (the
# arbitrary ones go to both loaders); about 15 s of CPU on one core
N_ARBITRARY, N_HEADED, N_FILES, N_MUTATED_PLANS, N_MUTATED_PROFILES, N_BYTES = 300, 300, 100, 1000, 500, 150
N_PLAUSIBLE = 600


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3_moe")  # 3 MoE layers, 8 experts, top-4


@pytest.fixture(scope="module")
def valid_plans(model):
    """One valid plan dict per kind of token policy (exact, variable, per-layer knob, shared knob)."""
    L = 3
    return [
        allocmoe.make_plan(model, [1, 4, 2]).to_dict(),
        allocmoe.make_plan(model, [2, 3, 2], token_policy="global", renormalize="keep-mass").to_dict(),
        allocmoe.make_plan(model, [2, 2, 3], token_policy="threshold", layer_params=[{"threshold": 0.1}] * L).to_dict(),
        allocmoe.make_plan(model, [2, 2, 2], token_policy={"name": "top-p", "p": 0.6}).to_dict(),
    ]


@pytest.fixture(scope="module")
def valid_profile(valid_plans):
    return {"format": "allocmoe-profile", "version": 1, "metric": "kl", "k_values": [1, 2, 3, 4],
            "sensitivity": [[1.0, 0.5, 0.1, 0.0], [2.0, 0.25, 0.125, 0.0], [0.5, 0.25, 0.0, 0.0]],
            "metrics": {"kl": [[1.0, 0.5, 0.1, 0.0], [2.0, 0.25, 0.125, 0.0], [0.5, 0.25, 0.0, 0.0]],
                        "loss": [[3.0, 1.0, 0.5, 0.0], [1.0, 1.0, 0.5, 0.0], [1.0, 0.5, 0.0, 0.0]]},
            "tokens": 100, "data": {"fingerprint": "abc"}, "settings": {"k_min": 1}, "model": valid_plans[0]["model"]}


def _refused(load, d, exc, pattern):
    with pytest.raises(exc, match=pattern) as e:
        load(d)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- files that load today still load ------------------------------------------------------------


def test_shipped_plans_still_load():
    n = 0
    for f in DOCS.glob("bench_*.json"):
        for name, d in (json.loads(f.read_text()).get("plans") or {}).items():
            p = Plan.from_dict(d, source=f"plan {name}")
            assert p.to_dict() == d  # nothing dropped or added on the way in
            n += 1
    assert n >= 4


def test_valid_files_round_trip(valid_plans, valid_profile, tmp_path):
    for d in valid_plans:
        (tmp_path / "p.json").write_text(json.dumps(d))
        assert Plan.load(tmp_path / "p.json").to_dict() == d
    prof = Profile.from_dict(valid_profile)
    assert prof.to_dict() == valid_profile and prof.with_metric("loss").sensitivity[0] == [3.0, 1.0, 0.5, 0.0]
    # optional parts may be absent (a hand-written profile) or null (older writers)
    minimal = {k: valid_profile[k] for k in ("format", "version", "metric", "k_values", "sensitivity", "model")}
    assert Profile.from_dict(minimal).metrics == {"kl": minimal["sensitivity"]}
    assert Plan.from_dict({**valid_plans[0], "meta": None, "budget": None}).meta == {}
    # unknown keys: kept inside rows / policies / fingerprints, ignored at the top level (newer writers)
    d = copy.deepcopy(valid_plans[1])
    d["layers"][0]["note"], d["token_policy"]["seed"], d["model"]["dtype"], d["future"] = "x", 3, "bf16", [1]
    p = Plan.from_dict(d)
    assert p.layers[0]["note"] == "x" and p.token_policy["seed"] == 3 and p.model["dtype"] == "bf16"


# ---- the findings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mutate, pattern", [
    (lambda d: d.update(model="abc"), r"^plan: model: must be an object, got 'abc'$"),
    (lambda d: d.update(budget="abc"), r"^plan: budget: must be an object, got 'abc'$"),
    (lambda d: d.update(meta=[1, 2]), r"^plan: meta: must be an object, got \[1, 2\]$"),
    (lambda d: d["budget"].update(fraction="half"), r"budget\.fraction: must be a finite number >= 0, got 'half'"),
    (lambda d: d["layers"][1].update(k="2"), r"layers\[1\]\.k: must be an integer >= 1, got '2'"),
    (lambda d: d["layers"][1].update(k=2.0), r"layers\[1\]\.k: must be an integer >= 1, got 2\.0"),
    (lambda d: d["layers"][1].update(k=True), r"layers\[1\]\.k: must be an integer >= 1, got True"),
    (lambda d: d["layers"][2].update(k=-3), r"layers\[2\]\.k: must be an integer >= 1, got -3"),
    (lambda d: d["layers"][2].update(k=10 ** 30), r"layers\[2\]\.k: k=10+ is out of range \[1, 4\] \(min_k/max_k of the token policy\)"),
    (lambda d: d["token_policy"].update(max_k="4"), r"token_policy\.max_k: must be an integer >= 1, got '4'"),
    (lambda d: d["token_policy"].update(max_k=9), r"token_policy\.max_k: 9 is more than the 8 experts"),
    (lambda d: d["token_policy"].update(min_k=5), r"token_policy: max_k \(4\) must be >= min_k \(5\)"),
    (lambda d: d["model"].update(num_experts="8"), r"model\.num_experts: must be an integer >= 1 or a list"),
    (lambda d: d["model"].update(top_k=[4, 4]), r"model: top_k has 2 entries but num_moe_layers is 3"),
    (lambda d: d["model"].update(top_k=9), r"model: top_k 9 is more than the 8 experts"),
    (lambda d: d["model"].pop("num_moe_layers"), r"model: has no 'num_moe_layers' field"),
    (lambda d: d.update(layers={"k": 2}), r"^plan: layers: must be a list"),
    (lambda d: d.update(compensation={"file": "x.safetensors"}), r"compensation: has no 'sha256' field"),
    (lambda d: d.update(method=3), r"method: must be a non-empty string, got 3"),
])
def test_wrong_types_and_ranges_in_a_plan(valid_plans, mutate, pattern):
    d = copy.deepcopy(valid_plans[1])  # global policy: min_k 1, max_k 4
    mutate(d)
    _refused(Plan.from_dict, d, errors.PlanError, pattern)


def test_a_bad_file_names_the_file_and_field(valid_plans, tmp_path, model):
    d = copy.deepcopy(valid_plans[0])
    d["layers"][2]["k"] = -1
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(d))
    msg = _refused(Plan.load, f, errors.PlanError, "layers")
    assert msg == f"plan {f}: layers[2].k: must be an integer >= 1, got -1"
    with pytest.raises(errors.PlanError, match="layers"):
        allocmoe.apply(model, f)
    assert allocmoe.applied_plan(model) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "0.1", None, True])
def test_a_calibrated_knob_must_be_finite(valid_plans, tmp_path, value):
    thr = copy.deepcopy(valid_plans[2])
    thr["layers"][1]["threshold"] = value
    (tmp_path / "t.json").write_text(json.dumps(thr))  # NaN / Infinity as Python's json writes them
    _refused(Plan.load, tmp_path / "t.json", errors.PlanError, r"layers\[1\]\.threshold: must be a finite number")
    top = copy.deepcopy(valid_plans[3])
    top["token_policy"]["p"] = value
    _refused(Plan.from_dict, top, errors.PlanError, r"token_policy\.p: must be a finite number in \[0\.0, 1\.0\]")


def test_a_shared_knob_must_be_in_its_range(valid_plans):
    top = copy.deepcopy(valid_plans[3])
    for p in (-0.1, 1.5, 1e308):
        top["token_policy"]["p"] = p
        _refused(Plan.from_dict, top, errors.PlanError, r"token_policy\.p: must be a finite number in \[0\.0, 1\.0\]")
    top["token_policy"]["p"] = 1.0
    assert Plan.from_dict(top).token_policy["p"] == 1.0
    # a per-layer knob is in score units (raw logits for some families): any finite value
    thr = copy.deepcopy(valid_plans[2])
    thr["layers"][0]["threshold"] = -3.5
    assert Plan.from_dict(thr).layers[0]["threshold"] == -3.5


def test_a_calibrated_policy_without_its_knob_is_refused(valid_plans, model):
    thr = copy.deepcopy(valid_plans[2])
    del thr["layers"][1]["threshold"]
    _refused(Plan.from_dict, thr, errors.PlanError, r"layers\[1\]: has no 'threshold'.*not calibrated")
    top = copy.deepcopy(valid_plans[3])
    del top["token_policy"]["p"]
    _refused(Plan.from_dict, top, errors.PlanError, r"token_policy: has no 'p'.*not calibrated")
    # a plan being made may lack it (make_plan, then calibrate), but it cannot be applied like that
    plan = allocmoe.make_plan(model, [2, 2, 2], token_policy="naee")
    with pytest.raises(errors.PlanError, match="has no 'beta'") as e:
        allocmoe.apply(model, plan)
    assert "\n" not in str(e.value) and allocmoe.applied_plan(model) is None


def test_the_nan_knob_plan_no_longer_runs_at_another_budget(valid_plans, model):
    """The finding: a NaN threshold ran every token at min_k; now it is refused, while the same plan with its
    real knob runs at about the budget it states."""
    ok = copy.deepcopy(valid_plans[2])
    ids = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with allocmoe.apply(model, ok) as h, torch.no_grad():
        model(ids)
        assert h.counts()["last"]["activations_per_token"] > len(ok["layers"])  # more than min_k everywhere
    for row in ok["layers"]:
        row["threshold"] = float("nan")
    with pytest.raises(errors.PlanError, match="must be a finite number"):
        allocmoe.apply(model, ok)


@pytest.mark.parametrize("mutate, pattern", [
    (lambda d: d.update(model="abc"), r"^profile: model: must be an object, got 'abc'$"),
    (lambda d: d.update(data=[1, 2]), r"^profile: data: must be an object"),
    (lambda d: d.update(settings="x"), r"^profile: settings: must be an object"),
    (lambda d: d.update(tokens="100"), r"tokens: must be an integer >= 0, got '100'"),
    (lambda d: d["sensitivity"][1].__setitem__(2, "0.1"), r"sensitivity\[1\]\[2\]: must be a finite number, got '0\.1'"),
    (lambda d: d["sensitivity"][0].__setitem__(0, float("nan")), r"sensitivity\[0\]\[0\]: must be a finite number"),
    (lambda d: d["metrics"]["loss"][2].__setitem__(1, float("inf")), r"metrics\.loss\[2\]\[1\]: must be a finite"),
    (lambda d: d["metrics"]["loss"].pop(), r"metrics\.loss: 2 rows but the model fingerprint has 3 MoE layers"),
    (lambda d: d["sensitivity"][0].pop(), r"sensitivity: must have one row of 4 values per MoE layer \(row 0 has 3\)"),
    (lambda d: d["sensitivity"].pop(), r"sensitivity: 2 rows but the model fingerprint has 3 MoE layers"),
    (lambda d: d.update(k_values=[1, 3, 2, 4]), r"k_values: must be strictly ascending"),
    (lambda d: d.update(k_values=[0, 1, 2, 3]), r"k_values\[0\]: must be an integer >= 1, got 0"),
    (lambda d: d.update(k_values=[1, 2, 3, 9]), r"k_values: 9 is more than the 8 experts"),
    (lambda d: d.update(metric="loss!"), r"metric: 'loss!' is not one of its metrics"),
    (lambda d: d.pop("k_values"), r"^profile: has no 'k_values' field$"),
    (lambda d: d.update(version=2), r"unknown profile version 2"),
    (lambda d: d.update(format="allocmoe-plan"), r"is not an allocmoe profile"),
])
def test_wrong_types_and_ranges_in_a_profile(valid_profile, mutate, pattern):
    d = copy.deepcopy(valid_profile)
    mutate(d)
    _refused(Profile.from_dict, d, errors.ProfileError, pattern)


# ---- the compensation file must belong to the plan ------------------------------------------------


def test_check_compensation_maps():
    check = schema.check_compensation_maps
    fixed, glob = {"name": "fixed"}, {"name": "global", "min_k": 1, "max_k": 4}
    check([2, 4], [4, 4], fixed, [[2], []], [4, 4])  # a full-K layer drops nothing: no map
    check([2, 3], [4, 4], glob, [[1, 2, 3], [2, 3]], [4, 4], {"ks": [2, 3], "token_policy": glob})
    with pytest.raises(errors.PlanError, match="layer 1 has a map for 2 kept experts, but at k=3 .* only \\[3\\]"):
        check([2, 3], [4, 4], fixed, [[2], [2]], [4, 4])
    with pytest.raises(errors.PlanError, match="layer 1 has a map for 3 kept .* keeps none"):
        check([2, 4], [4, 4], fixed, [[2], [3]], [4, 4])
    with pytest.raises(errors.PlanError, match="has maps for 3 MoE layers"):
        check([2, 2], [4, 4], fixed, [[2], [2], [2]], [4, 4, 4])
    with pytest.raises(errors.PlanError, match=r"top-k \[4, 6\]"):
        check([2, 2], [4, 4], fixed, [[2], [2]], [4, 6])
    with pytest.raises(errors.PlanError, match=r"fitted for a plan with k=\[3, 2\]"):
        check([2, 3], [4, 4], glob, [[2], [2]], [4, 4], {"ks": [3, 2]})
    with pytest.raises(errors.PlanError, match="fitted under token policy 'fixed'"):
        check([2, 2], [4, 4], glob, [[2], [2]], [4, 4], {"ks": [2, 2], "token_policy": fixed})


def test_a_compensation_file_from_another_plan_is_refused(tmp_path):
    m = tiny_model("deepseek_v2")  # 2 MoE layers, top-4
    windows = torch.randint(3, 97, (16, 24), generator=torch.Generator().manual_seed(3))
    a = allocmoe.allocate(m, budget=0.5, method="uniform", windows=windows, compensate=True, progress=False,
                          compensation_options={"prune": False})  # keep the maps a random model would not need
    assert a.ks == [2, 2]
    a.save(tmp_path / "a.json")
    ref = json.loads((tmp_path / "a.json").read_text())["compensation"]
    x = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    with allocmoe.apply(m, tmp_path / "a.json") as h, torch.no_grad():  # its own plan: accepted
        m(x)
        assert h.counts()["compensation"]["macs_per_token"] > 0
    others = {
        "b": allocmoe.make_plan(m, [3, 1]).to_dict(),  # same budget, other allocation: maps for 2 never used
        "c": allocmoe.make_plan(m, [2, 2], token_policy="global").to_dict(),  # same ks, other policy
    }
    for name, d in others.items():
        d["compensation"] = dict(ref)  # the other plan's file and its (correct) sha256
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
        with pytest.raises(errors.PlanError, match="belongs to another plan") as e:
            allocmoe.apply(m, tmp_path / f"{name}.json")
        assert "\n" not in str(e.value) and "a.compensation.safetensors" in str(e.value)
        assert allocmoe.applied_plan(m) is None


# ---- property tests: arbitrary JSON and mutated valid files -------------------------------------------

KEYS = ["format", "version", "layers", "model", "token_policy", "budget", "meta", "renormalize", "method",
        "compensation", "k", "name", "min_k", "max_k", "threshold", "p", "beta", "k_values", "sensitivity",
        "metric", "metrics", "tokens", "data", "settings", "num_moe_layers", "num_experts", "top_k",
        "architecture", "file", "sha256"]
HOSTILE = [float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 5e-324, 0, -1, 1, 2, 8, 9, 10 ** 30,
           -(10 ** 30), 2 ** 63, 0.5, 2.0, True, False, None, "", "abc", "1", "fixed", "global", [], {}, [1, 2],
           {"k": 1}]
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
           | st.sampled_from(HOSTILE))
keys = st.sampled_from(KEYS) | st.text(max_size=6)
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(keys, kids, max_size=5),
                           max_leaves=25)


def _loads_or_refuses(load, d, exc):
    """`load(d)`: the object, or None after exactly `exc` (an AllocMoeError) with a one-line message."""
    try:
        out = load(d)
    except exc as e:
        assert isinstance(e, errors.AllocMoeError) and str(e) and "\n" not in str(e), repr(e)
        event(f"refused by {type(e).__name__}")
        return None
    event("loaded")
    return out


def _check_loaded_plan(plan, model, ids):
    """A plan that loads is usable: it round-trips, and applies (or is refused as for another model)."""
    text = json.dumps(plan.to_dict())  # compared as text: NaN may sit in free-form meta
    assert json.dumps(Plan.from_dict(json.loads(text)).to_dict()) == text
    plan.compute_budget()
    try:
        handle = allocmoe.apply(model, plan)
    except errors.PlanError as e:  # ModelMismatchError among them
        assert "\n" not in str(e)
        event(f"apply refused by {type(e).__name__}")
        return
    event("applied")
    with handle, torch.no_grad():
        model(ids)
        n = handle.counts()["last"]["activations_per_token"]
    assert math.isfinite(n) and n >= 0
    if plan.policy == "fixed":
        assert n == sum(plan.ks)


@settings(ONE_CORE, max_examples=N_ARBITRARY)
@given(json_values)
def test_arbitrary_json(x):
    _loads_or_refuses(Plan.from_dict, x, errors.PlanError)
    _loads_or_refuses(Profile.from_dict, x, errors.ProfileError)


@settings(ONE_CORE, max_examples=N_HEADED)
@given(st.dictionaries(keys, json_values, max_size=8), st.sampled_from([1, 2, True, None]))
def test_arbitrary_json_with_a_valid_header(body, version):
    """Past the format and version checks: the schema itself meets arbitrary fields."""
    _loads_or_refuses(Plan.from_dict, {**body, "format": "allocmoe-plan", "version": version}, errors.PlanError)
    _loads_or_refuses(Profile.from_dict, {**body, "format": "allocmoe-profile", "version": version},
                      errors.ProfileError)


@settings(ONE_CORE, max_examples=N_FILES)
@given(json_values)
def test_arbitrary_json_files(x):
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "x.json"
        f.write_text(json.dumps(x))
        _loads_or_refuses(Plan.load, f, errors.PlanError)
        _loads_or_refuses(Profile.load, f, errors.ProfileError)


def _paths(obj, path=()):
    """Every (path) to a value inside obj (the root excluded)."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield path + (k,)
        yield from _paths(v, path + (k,))


@st.composite
def mutated(draw, docs):
    """A valid document with 1-3 hostile edits: a key dropped, a value's type changed, NaN / inf / huge /
    negative numbers, lists emptied, shortened or lengthened, keys added."""
    d = copy.deepcopy(draw(st.sampled_from(docs)))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(d))
        path = draw(st.sampled_from(paths))
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        key, value = path[-1], parent[path[-1]]
        kind = draw(st.sampled_from(["drop", "hostile", "json", "empty", "grow", "shrink", "add", "wrap"]
                                    + ["nudge"] * 4))  # plausible numbers: plans that load, then run
        if kind == "nudge" and isinstance(value, (int, float)) and not isinstance(value, bool):
            parent[key] = draw(st.integers(-1, 10) if isinstance(value, int) else st.floats(-1.0, 2.0))
        elif kind == "drop":
            del parent[key]
        elif kind == "hostile":
            parent[key] = copy.deepcopy(draw(st.sampled_from(HOSTILE)))
        elif kind == "json":
            parent[key] = draw(json_values)
        elif kind == "empty":
            parent[key] = type(value)() if isinstance(value, (list, dict, str)) else 0
        elif kind == "grow" and isinstance(value, list) and value:
            value.append(copy.deepcopy(value[draw(st.integers(0, len(value) - 1))]))
        elif kind == "shrink" and isinstance(value, list) and value:
            value.pop(draw(st.integers(0, len(value) - 1)))
        elif kind == "add" and isinstance(value, dict):
            value[draw(keys)] = draw(json_values)
        else:
            parent[key] = [value]
    return d


@settings(ONE_CORE, max_examples=N_MUTATED_PLANS)
@given(st.data())
def test_mutated_plans(model, valid_plans, data):
    d = data.draw(mutated(valid_plans))
    plan = _loads_or_refuses(Plan.from_dict, d, errors.PlanError)
    if plan is not None:
        _check_loaded_plan(plan, model, torch.tensor([[5, 6, 7, 8, 9, 10]]))


@st.composite
def plausible_plans(draw, base):
    """Plans for the test model with every semantic knob drawn near and across its limits: the policy, each
    k, min_k / max_k, the calibrated knobs (anywhere, any value), renormalize. Mostly valid values, so that
    many load and run."""
    d = copy.deepcopy(base)

    def often(valid, wild):  # the valid choice four times in five (hypothesis favours small integers)
        return draw(wild if draw(st.integers(0, 4)) == 4 else valid)

    small = st.integers(-1, 10) | st.sampled_from(HOSTILE)
    tp = {"name": often(st.sampled_from(sorted(allocmoe.policies.TOKEN_POLICIES)), st.just("magic"))}
    for key, valid in (("min_k", st.integers(1, 3)), ("max_k", st.integers(2, 10) | st.none())):  # 8 experts
        if draw(st.booleans()):
            tp[key] = often(valid, small)
    valid_knob = st.floats(0.0, 1.0)
    wild_knob = st.floats() | st.sampled_from([1e308, -1.0, 1.5, "0.5", None, True])
    knob_key = st.sampled_from(["threshold", "p", "beta"])
    for key in draw(st.sets(knob_key)):
        tp[key] = often(valid_knob, wild_knob)
    d["token_policy"] = tp
    n = often(st.just(3), st.sampled_from([2, 4]))
    d["layers"] = [{"k": often(st.integers(1, 5), small), "name": f"model.layers.{i}.mlp"} for i in range(n)]
    for row in d["layers"]:
        for key in draw(st.sets(knob_key)):
            row[key] = often(valid_knob, wild_knob)
    d["renormalize"] = often(st.sampled_from(["native", "renorm", "keep-mass"]), st.just("x"))
    return d


@settings(ONE_CORE, max_examples=N_PLAUSIBLE)
@given(st.data())
def test_plausible_plans_load_and_run_or_are_refused(model, valid_plans, data):
    """The semantic limits (k within the experts, max_k within the experts, min_k <= max_k, knobs finite and
    in range, present when needed): a plan that loads runs a forward pass; fixed ones at exactly sum(k)."""
    d = data.draw(plausible_plans(valid_plans[0]))
    plan = _loads_or_refuses(Plan.from_dict, d, errors.PlanError)
    if plan is not None:
        _check_loaded_plan(plan, model, torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]]))


@settings(ONE_CORE, max_examples=N_MUTATED_PROFILES)
@given(st.data())
def test_mutated_profiles(valid_profile, data):
    d = data.draw(mutated([valid_profile]))
    prof = _loads_or_refuses(Profile.from_dict, d, errors.ProfileError)
    if prof is not None:  # a profile that loads can be allocated from (or the budget is refused)
        text = json.dumps(prof.to_dict())
        assert json.dumps(Profile.from_dict(json.loads(text)).to_dict()) == text
        try:
            plan = allocmoe.allocate(prof, 0.5)
        except errors.AllocMoeError as e:
            assert "\n" not in str(e)
        else:
            assert len(plan.ks) == len(prof.sensitivity)


@settings(ONE_CORE, max_examples=N_BYTES)
@given(st.data())
def test_mangled_plan_files(valid_plans, data):
    """Byte-level damage (truncated, characters replaced or inserted) in a plan file on disk."""
    text = json.dumps(data.draw(st.sampled_from(valid_plans)))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(text)))
        text = text[:i] + data.draw(st.sampled_from(["", "x", "-", "9", "]", "{", '"', "NaN", "\x00", "é"])) + \
            text[i + data.draw(st.integers(0, 3)):]
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "plan.json"
        f.write_text(text, encoding="utf-8")
        _loads_or_refuses(Plan.load, f, errors.PlanError)


def test_deeply_nested_files_are_refused(tmp_path, valid_plans):
    f = tmp_path / "deep.json"
    f.write_text("[" * 100000 + "]" * 100000)
    _refused(Plan.load, f, errors.PlanError, "nested too deeply")
    deep = copy.deepcopy(valid_plans[0])
    cur = deep["meta"]
    for _ in range(5000):  # deeper than pydantic's recursion guard, shallower than Python's json reader's
        cur["a"] = {}
        cur = cur["a"]
    try:
        Plan.from_dict(deep)
    except errors.PlanError as e:
        assert "\n" not in str(e) and "meta" in str(e)
