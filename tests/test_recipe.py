"""Recipes (recipe.py): serialisable, validated in one line, the one place that says what plan-making needs, stored
in every plan's meta so that the plan can be re-made exactly."""

import inspect
import json

import pytest
import torch

import allocmoe
from allocmoe import planning
from allocmoe.errors import BudgetError, SettingsError
from allocmoe.methods import METHODS, AllocationMethod, register_method
from allocmoe.plan import Plan
from allocmoe.recipe import CALIBRATION_TOKENS, Recipe, check_budget, method_options
from allocmoe.testing import invoke_cli, tiny_model, tiny_tokenizer

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. ") * 40


def test_round_trip_through_json():
    r = Recipe.from_keywords(budget="0.5", method="search", token_policy={"name": "global", "min_k": 2},
                             renormalize="renorm", seed=3, compensate=True, compensation_rank=4,
                             compensation_ridge=0.05, compensation_options={"modes": ["teacher"]},
                             method_options={"generations": 2}, calibration_tokens=512, seq_len=32,
                             calibration_files=["a.txt"])
    d = json.loads(json.dumps(r.to_dict()))
    assert Recipe.from_dict(d) == r
    assert {k: d["method"][k] for k in ("name", "seed", "options")} == \
        {"name": "search", "seed": 3, "options": {"generations": 2}}
    assert d["token_policy"] == {"name": "global", "params": {"min_k": 2}, "renormalize": "renorm"}
    assert d["compensation"]["enabled"] is True and d["data"]["files"] == ["a.txt"]


@pytest.mark.parametrize("change, match", [
    ({"colour": 1}, "recipe field colour: unknown field"),
    ({"method": {"nme": "dp"}}, "recipe field method.nme: unknown field"),
    ({"method": {"name": "best"}}, "unknown allocation method 'best'"),
    ({"method": {"name": "dp", "seed": "1"}}, "recipe field method.seed: expected an integer"),
    ({"method": {"name": "dp", "options": {"generations": 3}}}, "method 'dp' has no such setting"),
    ({"method": {"name": "search", "options": {"generations": 0}}}, "must be at least 1"),
    ({"method": {"name": "search", "options": {"generations": "many"}}}, "expected int"),
    ({"token_policy": {"name": "sometimes"}}, "unknown token policy 'sometimes'"),
    ({"token_policy": {"name": "global", "params": {"min_k": 0}}}, "token_policy.params.min_k: must be at least 1"),
    ({"token_policy": {"renormalize": "sideways"}}, "token_policy.renormalize: choose native"),
    ({"compensation": {"rank": -2}}, "compensation.rank: must be at least 1"),
    ({"compensation": {"ridge": float("inf")}}, "compensation.ridge: expected a finite number"),
    ({"compensation": {"options": {"rank": 3}}}, "use compensation.rank"),
    ({"data": {"seq_len": 1}}, "data.seq_len: must be at least 2"),
    ({"data": {"calibration_tokens": 10, "seq_len": 32}}, "must be at least one window"),
    ({"data": {"files": "a.txt"}}, "data.files: expected a non-empty list"),
    ({"version": 9}, "recipe version 9 is not supported"),
])
def test_from_dict_refuses_bad_fields_in_one_line(change, match):
    d = Recipe().to_dict()
    for k, v in change.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    with pytest.raises(SettingsError, match=match) as e:
        Recipe.from_dict(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("budget", ["1e999999999", "9" * 5000, "nan", "-0.5", "0", "inf", "half", True, [0.5]])
def test_bad_budgets_are_one_line_budget_errors(budget):
    with pytest.raises(BudgetError) as e:
        check_budget(budget)
    assert "\n" not in str(e.value) and len(str(e.value)) < 200


def test_huge_budget_never_overflows_in_allocate(models):
    with pytest.raises(BudgetError, match="far too large"):
        allocmoe.allocate(models["deepseek_v2"], budget="1e999999999", method="uniform")
    assert check_budget("0.5") == "0.5" and check_budget(24) == 24 and check_budget(" 24 ") == "24"


def test_needs_follow_the_registries():
    assert Recipe.from_keywords(method="uniform").needs() == \
        Recipe.from_keywords(method="uniform").needs(have_profile=True)
    n = Recipe.from_keywords(method="uniform").needs()
    assert (n.model, n.text, n.profiling) == (False, False, False)
    n = Recipe.from_keywords(method="dp", token_policy="global").needs()
    assert (n.model, n.text, n.profiling, n.why) == (True, True, True, "profiling")
    n = Recipe.from_keywords(method="dp", token_policy="global").needs(have_profile=True)
    assert (n.model, n.text) == (False, False)  # the profile is enough
    n = Recipe.from_keywords(method="dp", token_policy="threshold").needs(have_profile=True)
    assert (n.model, n.text, n.why) == (True, True, "token policy 'threshold'")
    n = Recipe.from_keywords(method="lexi").needs()
    assert (n.model, n.text, n.why) == (True, False, "method 'lexi'")
    n = Recipe.from_keywords(method="search").needs(have_profile=True)
    assert (n.model, n.text) == (True, True)
    n = Recipe.from_keywords(method="uniform", compensate=True).needs()
    assert (n.model, n.text, n.why) == (True, True, "compensation")

    # a newly registered method is read from its class attributes, not from a list kept elsewhere
    @register_method
    class Scored(AllocationMethod):
        name, needs_windows, rounds = "scored-test", True, 3

    try:
        n = Recipe.from_keywords(method="scored-test").needs()
        assert (n.model, n.text, n.why) == (True, True, "method 'scored-test'")
        assert method_options("scored-test") == {"rounds": 3}
    finally:
        del METHODS["scored-test"]


def test_one_calibration_token_default():
    from allocmoe.cli import app

    assert inspect.signature(planning.calibration_windows).parameters["tokens"].default == CALIBRATION_TOKENS
    assert Recipe().data.calibration_tokens == CALIBRATION_TOKENS
    options = {c.callback.__name__: inspect.signature(c.callback).parameters for c in app.registered_commands}
    assert options["profile"]["tokens"].default.default == CALIBRATION_TOKENS
    # allocate's flags default to None (a --recipe may set them); the recipe's default is the one it names
    assert options["allocate"]["tokens"].default.default is None
    assert f"default {CALIBRATION_TOKENS}" in options["allocate"]["tokens"].default.help


def test_keyword_form_equals_recipe_form(models):
    m = models["deepseek_v2"]
    a = allocmoe.allocate(m, 0.5, "uniform", token_policy="global")
    b = allocmoe.allocate(m, Recipe.from_keywords(budget=0.5, method="uniform", token_policy="global"))
    c = allocmoe.allocate(m, recipe=Recipe.from_keywords(method="uniform", token_policy="fixed"), budget=0.5,
                          token_policy="global")  # keywords override the recipe's fields
    assert a.to_dict() == b.to_dict() == c.to_dict()
    assert a.meta["recipe"]["token_policy"]["name"] == "global" and a.meta["recipe"]["budget"] == 0.5
    with pytest.raises(SettingsError, match="unknown setting 'tokenpolicy'"):
        allocmoe.allocate(m, 0.5, "uniform", tokenpolicy="global")
    with pytest.raises(SettingsError, match="pass a budget"):
        allocmoe.allocate(m, Recipe.from_keywords(method="uniform"))
    # the source and the keywords cannot name two different models or profiles
    with pytest.raises(SettingsError, match="two models"):
        allocmoe.allocate(m, 0.5, "uniform", model=models["olmoe"])
    with pytest.raises(SettingsError, match="two profiles"):
        allocmoe.allocate({"k_values": [1]}, 0.5, profile={"k_values": [2]})


def test_search_settings_are_reachable(models, monkeypatch):
    from allocmoe import search

    seen = []
    real = search.search_allocation

    def spy(*a, **k):
        seen.append(k)
        return real(*a, **k)

    monkeypatch.setattr(search, "search_allocation", spy)
    m, tok = models["deepseek_v2"], tiny_tokenizer()
    kw = dict(method="search", tokenizer=tok, texts=[TEXT], seq_len=32, calibration_tokens=256, progress=False)
    default = allocmoe.allocate(m, 0.5, **kw)
    tuned = allocmoe.allocate(m, 0.5, method_options={"generations": 2, "offspring": 3}, **kw)
    assert (seen[0]["generations"], seen[0]["offspring"]) == (METHODS["search"].generations,
                                                              METHODS["search"].offspring)
    assert (seen[1]["generations"], seen[1]["offspring"]) == (2, 3)
    assert tuned.meta["recipe"]["method"]["options"] == {"generations": 2, "offspring": 3}
    assert default.meta["recipe"]["method"]["options"] == {}
    assert METHODS["search"].generations == 12  # the registered method is untouched


def test_plan_is_remade_from_its_saved_recipe(tmp_path):
    """dp (profiled inline) + a calibrated policy + compensation, text from a file: the saved plan's recipe alone
    (with the model and tokenizer) re-makes the identical plan and compensation maps."""
    m, tok = tiny_model("qwen3_moe"), tiny_tokenizer()
    (tmp_path / "cal.txt").write_text(TEXT)
    plan = allocmoe.allocate(m, 0.5, token_policy="threshold", compensate=True, tokenizer=tok, seq_len=32,
                             calibration_tokens=512, calibration_files=[str(tmp_path / "cal.txt")], progress=False)
    plan.save(tmp_path / "plan.json")
    saved = json.loads((tmp_path / "plan.json").read_text())
    rec = saved["meta"]["recipe"]
    assert rec["data"]["files"] == [str(tmp_path / "cal.txt")] and rec["data"]["given"] is False
    assert rec["compensation"]["enabled"] and isinstance(rec["compensation"]["ridge"], float)
    planning._windows_cache.clear()  # re-made from the file, not from memory

    again = allocmoe.allocate(m, Recipe.from_dict(rec), tokenizer=tok, progress=False)
    again.save(tmp_path / "again.json")
    remade = json.loads((tmp_path / "again.json").read_text())
    for d in (remade, saved):  # the maps' file name (and the file's sha256) follow the plan's name
        d["compensation"] = {k: v for k, v in d["compensation"].items() if k not in ("file", "sha256")}
    assert remade == saved
    from safetensors import safe_open

    a, b = (safe_open(str(tmp_path / f"{n}.compensation.safetensors"), "pt") for n in ("plan", "again"))
    assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
    assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())

    # the same text passed in as windows gives the same plan, described as the recipe has it (read from the file)
    w = planning.calibration_windows(tok, [TEXT], tokens=512, seq_len=32)
    assert allocmoe.allocate(m, Recipe.from_dict(rec), windows=w, progress=False).meta["recipe"] == rec
    # other text than the recipe's is refused rather than silently giving another plan
    (tmp_path / "cal.txt").write_text(TEXT.upper())
    with pytest.raises(SettingsError, match="calibration text differs from the recipe's"):
        allocmoe.allocate(m, Recipe.from_dict(rec), tokenizer=tok, progress=False)


def test_recipe_of_passed_in_text_asks_for_it_again(models):
    m, tok = models["deepseek_v2"], tiny_tokenizer()
    w = planning.calibration_windows(tok, [TEXT], tokens=256, seq_len=32)
    plan = allocmoe.allocate(m, 0.5, "uniform", token_policy="top-p", windows=w, progress=False)
    r = Recipe.from_dict(plan.meta["recipe"])
    assert r.data.given
    with pytest.raises(SettingsError, match="was passed in"):
        allocmoe.allocate(m, r, tokenizer=tok, progress=False)
    with pytest.raises(SettingsError, match="differs from the recipe's"):
        allocmoe.allocate(m, r, windows=w[:, :16].contiguous(), progress=False)
    assert allocmoe.allocate(m, r, windows=w, progress=False).to_dict() == plan.to_dict()


def test_profile_file_named_by_the_recipe_is_read_and_checked(models, tmp_path):
    m = models["deepseek_v2"]
    w = torch.randint(3, 97, (4, 24), generator=torch.Generator().manual_seed(1))
    allocmoe.profile(m, w, progress=False, out=tmp_path / "p.json")
    plan = allocmoe.allocate(m, 0.5, profile=str(tmp_path / "p.json"))
    rec = plan.meta["recipe"]["data"]
    assert rec["profile"] == str(tmp_path / "p.json") and rec["profile_fingerprint"].startswith("sha256:")
    again = allocmoe.allocate(m, Recipe.from_dict(plan.meta["recipe"]))  # reads the file the recipe names
    assert again.to_dict() == plan.to_dict()
    allocmoe.profile(m, w[:2], progress=False, out=tmp_path / "p.json")  # another profile under the same name
    with pytest.raises(SettingsError, match="the profile differs from the recipe's"):
        allocmoe.allocate(m, Recipe.from_dict(plan.meta["recipe"]))


def test_cli_allocate_from_a_recipe_or_a_plan(tiny_dir, tmp_path):
    d = tiny_dir("deepseek_v2")
    rc, _, err = invoke_cli("allocate", "--model", d, "--method", "uniform", "--token-policy", "global",
                            "--budget", "0.5", "--out", tmp_path / "a.json")
    assert rc == 0, err
    a = Plan.load(tmp_path / "a.json")
    # the plan as the recipe: the same plan again; a flag overrides one field
    rc, _, err = invoke_cli("allocate", "--model", d, "--recipe", tmp_path / "a.json", "--out", tmp_path / "b.json")
    assert rc == 0, err
    assert Plan.load(tmp_path / "b.json").to_dict() == a.to_dict()
    (tmp_path / "r.json").write_text(json.dumps(a.meta["recipe"]))
    rc, _, err = invoke_cli("allocate", "--model", d, "--recipe", tmp_path / "r.json", "--budget", "0.25",
                            "--out", tmp_path / "c.json")
    assert rc == 0, err
    c = Plan.load(tmp_path / "c.json")
    assert c.token_policy["name"] == "global" and sum(c.ks) < sum(a.ks)
    (tmp_path / "bad.json").write_text(json.dumps({**a.meta["recipe"], "method": {"name": "best"}}))
    rc, _, err = invoke_cli("allocate", "--model", d, "--recipe", tmp_path / "bad.json", "--out", tmp_path / "d.json")
    assert rc == 2 and err.startswith("error: unknown allocation method 'best'") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d.json").exists()
