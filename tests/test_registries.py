"""The extension points: token-policy and method registries drive the CLI, validation and the main job;
plan-making in one call profiles only when the method needs it."""

import pytest
import torch

import allocmoe
from allocmoe import methods, policies
from allocmoe.run import run_configs
from allocmoe.testing import invoke_cli, tiny_tokenizer

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. ") * 30


@pytest.fixture
def top1plus():
    """The README's example policy, registered for one test and removed afterwards."""

    @policies.register_policy
    class Top1Plus(policies.TokenPolicy):
        name, summary = "top1plus", "one expert, two when the top score is below 0.5"

        def counts(self, c, k, params, min_k):
            return 1 + (c.vals[:, 0] < 0.5).long()

    yield Top1Plus
    del policies.TOKEN_POLICIES["top1plus"]


def test_a_registered_policy_is_usable_everywhere(top1plus, models, tiny_dir, tmp_path):
    tmp_dir, plan_path = tiny_dir("qwen3_moe"), tmp_path / "plan.json"
    m = models["qwen3_moe"]
    L = len(allocmoe.find_moe_layers(m))
    plan = allocmoe.make_plan(m, [2] * L, token_policy="top1plus")  # validation knows it
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with allocmoe.apply(m, plan, record=True) as h, torch.no_grad():
        m(ids)
        sel = [h.last_selection(l) for l in range(L)]
        pairs = h.counts()["last"]["pairs_per_layer"]
    for s, p in zip(sel, pairs):
        n = (s >= 0).sum(-1)
        assert set(n.tolist()) <= {1, 2} and int(n.sum()) == p
    # the CLI validates against the live registry (its help lists the policies registered at import)
    rc, _, err = invoke_cli("allocate", "--model", tmp_dir, "--method", "uniform", "--budget", "0.5",
                            "--token-policy", "top1plus", "--out", plan_path)
    assert rc == 0, err
    assert allocmoe.Plan.load(plan_path).token_policy["name"] == "top1plus"
    rc, out, _ = invoke_cli("allocate", "--help")
    assert rc == 0 and all(name in out for name in ("fixed", "global", "threshold", "top-p", "naee"))


def test_main_job_configs_follow_the_registries(monkeypatch):
    base = [c.label for c in run_configs(ablation=False) if not c.compensate]
    assert base == ["uniform", "random", "greedy", "lexi", "Alloc-L (dp)", "Alloc-L + Alloc-T (dp+global)",
                    "Alloc-L + threshold (dp+threshold)", "top-p", "naee"]
    monkeypatch.setattr(policies.TOKEN_POLICIES["naee"], "run_with", None)
    assert "naee" not in [c.label for c in run_configs()]
    # the ablation: every lever alone and combined, only at one budget
    abl = [c for c in run_configs() if c.ablation]
    assert {c.method for c in abl} == {"uniform", "search"}  # dp+global is a main configuration
    assert not any(c.profile_policy == "global" for c in abl)  # policy-aware profiling is opt-in
    assert any(c.profile_policy == "global" and c.ablation for c in run_configs(policy_aware=True))
    assert not any(c.ablation for c in run_configs(ablation=False))


def test_one_call_allocate_profiles_only_when_needed(models, monkeypatch):
    m, tok = models["deepseek_v2"], tiny_tokenizer()
    calls = []
    real = allocmoe.profiling.profile

    def counting_profile(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(allocmoe.profiling, "profile", counting_profile)
    plan = allocmoe.allocate(m, budget=0.5, token_policy="global", tokenizer=tok, texts=[TEXT], seq_len=32,
                             calibration_tokens=256, progress=False, guard=False)
    assert calls == [1] and plan.method == "dp" and sum(plan.ks) == sum(plan.original_ks) // 2
    assert plan.token_policy["name"] == "global" and plan.meta["profile_metric"] == "kl"
    # the same profile passed in: no profiling, same plan
    prof = real(m, allocmoe.planning.calibration_windows(tok, [TEXT], None, 256, 32), progress=False, at=0.5)
    again = allocmoe.allocate(m, budget=0.5, token_policy="global", profile=prof)
    assert len(calls) == 1 and again.ks == plan.ks
    # a method that needs no profile never profiles, and needs no text
    allocmoe.allocate(m, budget=0.5, method="uniform")
    assert len(calls) == 1


def test_one_call_allocate_errors_name_the_missing_piece(models):
    m = models["deepseek_v2"]
    with pytest.raises(allocmoe.SettingsError, match="needs calibration text") as e:
        allocmoe.allocate(m, budget=0.5)  # dp without a profile, tokenizer or windows
    assert e.value.param == "tokenizer"
    with pytest.raises(allocmoe.SettingsError, match="pass a budget"):
        allocmoe.allocate(m)
    with pytest.raises(allocmoe.SettingsError, match="unknown allocation method 'best'"):
        allocmoe.allocate(m, budget=0.5, method="best")
    assert set(methods.METHODS) >= {"dp", "greedy", "uniform", "random", "lexi"}


def test_registries_refuse_a_second_class_under_a_taken_name():
    with pytest.raises(ValueError, match="token policy 'global' is already registered"):
        @policies.register_policy
        class Again(policies.TokenPolicy):
            name = "global"
    assert type(policies.TOKEN_POLICIES["global"]).__name__ != "Again"
    with pytest.raises(allocmoe.SettingsError, match=r"unknown allocation method 'x' \(choose from uniform, "):
        allocmoe.methods.get_method("x")


def test_every_method_is_registered_by_a_plain_import():
    # a fresh interpreter: in this one every module is imported already, which would hide a method that is
    # registered only when its own module happens to be imported
    import subprocess
    import sys

    code = "import allocmoe; print(','.join(allocmoe.METHODS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.split(",") == list(methods.METHODS)
    assert {"dp", "greedy", "uniform", "random", "lexi", "search"} <= set(out.split(","))
    assert out.split(",")[-1] == "search"  # after the built-in methods, as the CLI lists them


@pytest.fixture
def every_two():
    """A method registered for one test and removed afterwards: k = 2 in every layer."""

    @methods.register_method
    class EveryTwo(methods.AllocationMethod):
        name, label, summary = "every-two", "every two", "k = 2 in every layer"

        def allocate(self, ctx):
            return [2] * ctx.num_layers

    yield EveryTwo
    del methods.METHODS["every-two"]


def test_a_registered_method_is_usable_from_python_and_the_cli(every_two, models, tiny_dir, tmp_path):
    m = models["qwen3_moe"]  # 3 MoE layers
    plan = allocmoe.allocate(m, budget=6, method="every-two")
    assert plan.ks == [2, 2, 2] and plan.method == "every-two"
    rc, _, err = invoke_cli("allocate", "--model", tiny_dir("qwen3_moe"), "--method", "every-two", "--budget", "6",
                            "--out", tmp_path / "p.json")
    assert rc == 0, err
    assert allocmoe.Plan.load(tmp_path / "p.json").ks == [2, 2, 2]


def test_a_registered_family_is_found_and_patched():
    """README's "how to add a family": one FamilyAdapter subclass with @register_family. A router class no
    adapter claims is refused (naming the known families); once one class claims it, the model is found,
    patched and counted like any other."""
    from allocmoe.adapters import ADAPTERS, register_family
    from allocmoe.adapters.families import SoftmaxTopK
    from allocmoe.errors import UnsupportedModelError
    from allocmoe.testing import tiny_model

    m = tiny_model("qwen3_moe")
    for mod in m.modules():  # the same routing under a router class name nobody knows
        if type(mod).__name__ == "Qwen3MoeTopKRouter":
            mod.__class__ = type("AcmeTopKRouter", (type(mod),), {})
    with pytest.raises(UnsupportedModelError, match=r"router AcmeTopKRouter.*supported families: .*qwen3_moe"):
        allocmoe.find_moe_layers(m)

    @register_family
    class Acme(SoftmaxTopK):
        name, router_classes = "acme", ("AcmeTopKRouter",)

    try:
        layers = allocmoe.find_moe_layers(m)
        assert layers and all(l.adapter.name == "acme" for l in layers)
        plan = allocmoe.make_plan(m, [1] * len(layers))
        ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            full = m(ids).logits
            with allocmoe.apply(m, plan) as h:
                cut = m(ids).logits
                assert h.counts()["last"]["activations_per_token"] == len(layers)
            assert torch.equal(m(ids).logits, full) and not torch.allclose(cut, full)
    finally:
        del ADAPTERS["acme"]
