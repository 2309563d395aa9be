"""Compensation wired into plans: allocate(compensate=True), the file beside the plan, apply() loading it,
measured compensation work in the counts, and one-line errors for a missing or mismatched file."""

import json

import pytest
import torch

import allocmoe
from allocmoe.testing import invoke_cli, save_tiny, tiny_model

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 40


@pytest.fixture(scope="module")
def model():
    return tiny_model("deepseek_v2")


@pytest.fixture(scope="module")
def windows():
    return torch.randint(3, 97, (24, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def comp_plan(model, windows):
    # every layer keeps its maps (no pruning: on a random model they would not help beyond noise, see
    # test_compensation_select.py), so the plumbing below has maps to carry
    return allocmoe.allocate(model, budget=0.5, method="uniform", token_policy="global", windows=windows,
                             compensate=True, compensation_options={"prune": False}, progress=False)


def _logits(m, plan, x, **kw):
    with allocmoe.apply(m, plan, **kw) as h, torch.no_grad():
        return m(x).logits, h.counts()


def test_plan_with_compensation_round_trip(model, comp_plan, tmp_path):
    x = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(9))
    comp_plan.save(tmp_path / "plan.json")
    d = json.loads((tmp_path / "plan.json").read_text())
    assert d["compensation"]["file"] == "plan.compensation.safetensors" and len(d["compensation"]["sha256"]) == 64
    assert (tmp_path / "plan.compensation.safetensors").exists()
    a, ca = _logits(model, comp_plan, x)
    b, cb = _logits(model, tmp_path / "plan.json", x)  # loads the file beside the plan
    assert torch.equal(a, b) and ca == cb
    # the measured work: real activations beside compensation multiply-adds, within the 10% cap of the saved work
    H, I = model.config.hidden_size, model.config.moe_intermediate_size
    saved = (sum(comp_plan.original_ks) - cb["last"]["activations_per_token"]) * 3 * H * I
    assert 0 < cb["compensation"]["macs_per_token"] <= 0.25 * saved
    # without compensation the same plan gives other logits (the maps do something)
    plain = allocmoe.Plan.from_dict({k: v for k, v in d.items() if k != "compensation"})
    c, cc = _logits(model, plain, x)
    assert not torch.equal(a, c) and "compensation" not in cc and cc["last"] == cb["last"]


def test_allocate_fits_with_the_documented_default_ridge(comp_plan):
    from allocmoe.compensation_fit import DEFAULT_RIDGE

    comp = comp_plan.compensation_maps
    assert DEFAULT_RIDGE == 0.1  # what the main job's numbers were made with
    assert comp.meta["ridge"] == DEFAULT_RIDGE and comp_plan.compensation["ridge"] == DEFAULT_RIDGE
    assert comp.meta["selection"]["chosen"] in ("teacher", "sequential")


def test_full_plan_with_compensation_is_exact(model, comp_plan):
    x = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    full = allocmoe.full_plan(model)
    ref, _ = _logits(model, full, x)
    got, counts = _logits(model, full, x, compensation=comp_plan.compensation_maps)
    assert torch.equal(ref, got) and counts["compensation"]["macs_per_token"] == 0


def test_missing_or_mismatched_compensation_file(model, comp_plan, tmp_path):
    comp_plan.save(tmp_path / "plan.json")
    f = tmp_path / "plan.compensation.safetensors"
    data = f.read_bytes()
    f.unlink()
    with pytest.raises(allocmoe.AllocMoeError) as e:
        allocmoe.apply(model, tmp_path / "plan.json")
    assert "plan.compensation.safetensors" in str(e.value) and "\n" not in str(e.value)
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped byte: the sha256 in the plan differs
    with pytest.raises(allocmoe.AllocMoeError) as e:
        allocmoe.apply(model, tmp_path / "plan.json")
    assert "\n" not in str(e.value)
    assert allocmoe.applied_plan(model) is None  # nothing left patched after a refused apply


def test_cli_allocate_compensate_and_eval(tmp_path):
    d = save_tiny("deepseek_v2", tmp_path / "m")
    (tmp_path / "t.txt").write_text(TEXT)
    rc, _, err = invoke_cli("allocate", "--model", d, "--method", "uniform", "--budget", "0.5", "--compensate",
                            "--data", tmp_path / "t.txt", "--tokens", "768", "--seq-len", "32",
                            "--out", tmp_path / "p.json")
    assert rc == 0, err
    assert "compensation in p.compensation.safetensors" in err
    task = {"name": "toy", "examples": [{"input": "a single", "target_scores": {"man": 1, "dog": 0}}]}
    (tmp_path / "task.json").write_text(json.dumps(task))
    rc, _, err = invoke_cli("eval", "--model", d, "--plan", tmp_path / "p.json", "--data", tmp_path / "t.txt",
                            "--task", tmp_path / "task.json", "--seq-len", "32", "--out", tmp_path / "e.json")
    assert rc == 0, err
    e = json.loads((tmp_path / "e.json").read_text())
    # the CLI prunes maps that do not help (compensation_select.py): the work measured matches the layers kept
    kept = json.loads((tmp_path / "p.json").read_text())["compensation"]["kept_layers"]
    assert e["activations_per_token"] == 4 and (e["compensation"]["macs_per_token"] > 0) == bool(kept)
    assert "compensation" in err and "expert activations" in err
