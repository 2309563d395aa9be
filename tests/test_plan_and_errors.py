"""Plan validation and the one-line errors of the API and the CLI."""

import json
import pytest
import torch
import transformers as tf

import allocmoe
from allocmoe import errors
from allocmoe.testing import invoke_cli, tiny_model


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("models")
    out = {f: tiny_dir(f) for f in ("deepseek_v2", "qwen3_moe")}
    dense = tf.LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
    tf.LlamaForCausalLM(dense).save_pretrained(d / "dense")
    out["dense"] = str(d / "dense")
    return out


cli = invoke_cli  # in-process; tests/test_run_and_cli.py proves the console script itself works


def test_plan_round_trip(tmp_path, models):
    m = models["qwen3_moe"]
    p = allocmoe.make_plan(m, [1, 4, 2], token_policy="global", renormalize="keep-mass", method="test")
    p.save(tmp_path / "p.json")
    q = allocmoe.Plan.load(tmp_path / "p.json")
    assert q.to_dict() == p.to_dict()
    d = json.loads((tmp_path / "p.json").read_text())
    assert [l["k"] for l in d["layers"]] == [1, 4, 2]
    assert d["budget"]["activations_per_token"] == 7 and d["budget"]["fraction"] == round(7 / 12, 6)
    assert d["model"]["architecture"] == "Qwen3MoeForCausalLM" and d["model"]["num_moe_layers"] == 3
    assert d["model"]["num_experts"] == 8 and d["model"]["top_k"] == 4


def _plan_dict(models):
    return allocmoe.make_plan(models["qwen3_moe"], [2, 2, 2]).to_dict()


@pytest.mark.parametrize(
    "mutate, exc, msg",
    [
        (lambda d: d["layers"][0].update(k=0), errors.PlanError, r"^plan: layers\[0\]\.k: must be an integer >= 1, got 0$"),
        (lambda d: d["layers"][1].update(k=9), errors.PlanError, r"layers\[1\]\.k: k=9 is out of range \[1, 8\]"),
        (lambda d: d.update(version=7), errors.PlanError, "unknown plan version 7"),
        (lambda d: d.update(format="x"), errors.PlanError, "not an allocmoe plan"),
        (lambda d: d["layers"].pop(), errors.PlanError, "plan has 2 layers but its model fingerprint has 3"),
        (lambda d: d["token_policy"].update(name="magic"), errors.PlanError, "unknown token policy 'magic'"),
        (lambda d: d.update(renormalize="x"), errors.PlanError, "unknown renormalize mode 'x'"),
        (lambda d: d["layers"][0].update(k="2"), errors.PlanError, r"layers\[0\]\.k: must be an integer >= 1, got '2'"),
        (lambda d: d["layers"][2].pop("k"), errors.PlanError, r"layers\[2\]: has no 'k' field"),
        (lambda d: d.pop("token_policy"), errors.PlanError, r"^plan: has no 'token_policy' field$"),
        (lambda d: d["token_policy"].update(min_k=0), errors.PlanError, r"token_policy\.min_k: must be an integer >= 1"),
        (lambda d: d.update(version="1"), errors.PlanError, "unknown plan version '1'"),
        (lambda d: d["model"].update(num_experts=[8, 8]), errors.PlanError, "num_experts has 2 entries but num_moe_layers is 3"),
    ],
)
def test_plan_validation_errors(models, mutate, exc, msg):
    d = _plan_dict(models)
    mutate(d)
    with pytest.raises(exc, match=msg):
        allocmoe.apply(models["qwen3_moe"], d)


def test_plan_for_another_model_is_refused(models):
    d = _plan_dict(models)  # qwen3 plan (3 MoE layers) onto mixtral (3 MoE layers, other architecture)
    with pytest.raises(errors.ModelMismatchError, match="made for another model: architecture"):
        allocmoe.apply(models["mixtral"], d)
    with pytest.raises(errors.ModelMismatchError, match="plan has 3 MoE layers but the model has 2"):
        allocmoe.apply(models["deepseek_v2"], d)
    other = tiny_model("qwen3_moe", num_experts=16)
    with pytest.raises(errors.ModelMismatchError, match="num_experts is 8 in the plan but 16 in the model"):
        allocmoe.apply(other, d)


def test_corrupt_plan_file(tmp_path, models):
    f = tmp_path / "bad.json"
    f.write_text('{"format": "allocmoe-plan", "layers": [')
    with pytest.raises(errors.PlanError, match=r"is not valid JSON \(line 1"):
        allocmoe.apply(models["qwen3_moe"], f)
    with pytest.raises(errors.PlanError, match="does not exist"):
        allocmoe.apply(models["qwen3_moe"], tmp_path / "missing.json")


def test_no_moe_layers_and_refused_families():
    dense = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(errors.NoMoELayersError, match="has no MoE layers"):
        allocmoe.find_moe_layers(dense)
    phi = tf.AutoModelForCausalLM.from_config(tf.PhimoeConfig(
        vocab_size=50, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4))
    with pytest.raises(errors.UnsupportedModelError, match="hard-codes top-2"):
        allocmoe.find_moe_layers(phi)


# ---- CLI ------------------------------------------------------------------------------------------


def test_cli_info_json(tiny_dirs):
    rc, out, _ = cli("info", "--model", tiny_dirs["deepseek_v2"], "--json")
    assert rc == 0
    d = json.loads(out)
    assert d["architecture"] == "DeepseekV2ForCausalLM" and d["moe_layers"] == 2 and d["dense_layers"] == 1
    assert d["num_experts"] == 8 and d["top_k"] == 4 and d["shared_experts"] == 1
    assert d["path"] == tiny_dirs["deepseek_v2"]


def test_cli_allocate_uniform_and_apply(tiny_dirs, tmp_path):
    plan = tmp_path / "plan.json"
    rc, _, e = cli("allocate", "--model", tiny_dirs["qwen3_moe"], "--method", "uniform", "--budget", "0.5",
                   "--out", plan, "--token-policy", "global")
    assert rc == 0, e
    d = json.loads(plan.read_text())
    assert [l["k"] for l in d["layers"]] == [2, 2, 2] and d["token_policy"]["name"] == "global"
    m = tf.AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen3_moe"])
    with allocmoe.apply(m, plan) as h, torch.no_grad():
        m(torch.tensor([[5, 6, 7, 8]]))
        assert h.counts()["last"]["activations_per_token"] == 6
    # an existing file is not overwritten silently
    rc, _, e = cli("allocate", "--model", tiny_dirs["qwen3_moe"], "--method", "uniform", "--budget", "7",
                   "--out", plan)
    assert rc == 2 and "already exists; refusing to overwrite it (pass --force to overwrite)" in e


@pytest.mark.parametrize(
    "args, msg",
    [
        (["allocate", "--method", "uniform", "--budget", "0.01"], "budget 0.01 .* is infeasible: feasible range is 3..12"),
        (["allocate", "--method", "uniform", "--budget", "abc"], "not a number"),
        (["allocate", "--method", "dp", "--budget", "0.5"], "needs --profile"),
        (["info"], None),
    ],
)
def test_cli_bad_input_one_line(tiny_dirs, tmp_path, args, msg):
    if msg is None:
        rc, _, e = cli("info", "--model", tiny_dirs["dense"])
        msg = "has no MoE layers"
    else:
        rc, _, e = cli(*args, "--model", tiny_dirs["qwen3_moe"], "--out", tmp_path / "o.json")
    assert rc == 2
    lines = [l for l in e.strip().splitlines() if l.strip() and not l.startswith(("Loading", "Writing"))]
    assert len(lines) == 1 and lines[0].startswith("error:"), e
    import re

    assert re.search(msg, lines[0]), lines[0]


def test_cli_wrong_model_plan_and_corrupt_files(tiny_dirs, tmp_path):
    plan = tmp_path / "plan.json"
    assert cli("allocate", "--model", tiny_dirs["deepseek_v2"], "--method", "uniform", "--budget", "0.5",
               "--out", plan)[0] == 0
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    rc, _, e = cli("allocate", "--profile", bad, "--budget", "0.5", "--out", tmp_path / "x.json")
    assert rc == 2 and e.strip().startswith("error:") and "not valid JSON" in e and len(e.strip().splitlines()) == 1
    # a profile for deepseek used with the qwen model
    prof = {"format": "allocmoe-profile", "version": 1, "metric": "kl", "k_values": [1, 2, 3, 4],
            "sensitivity": [[1, 0.5, 0.1, 0], [1, 0.5, 0.1, 0]], "tokens": 10,
            "model": json.loads(plan.read_text())["model"]}
    pf = tmp_path / "prof.json"
    pf.write_text(json.dumps(prof))
    rc, _, e = cli("allocate", "--profile", pf, "--model", tiny_dirs["qwen3_moe"], "--budget", "0.5",
                   "--out", tmp_path / "y.json")
    assert rc == 2 and "profile was made for another model" in e
    rc, _, e = cli("profile", "--model", tiny_dirs["qwen3_moe"], "--data", tmp_path / "empty.txt", "--out",
                   tmp_path / "z.json")
    assert rc == 2 and "does not exist" in e
    (tmp_path / "empty.txt").write_text("  \n")
    rc, _, e = cli("profile", "--model", tiny_dirs["qwen3_moe"], "--data", tmp_path / "empty.txt", "--out",
                   tmp_path / "z.json")
    assert rc == 2 and "is empty" in e
    (tmp_path / "short.txt").write_text("Too short.")
    rc, _, e = cli("profile", "--model", tiny_dirs["qwen3_moe"], "--data", tmp_path / "short.txt", "--out",
                   tmp_path / "z.json")
    assert rc == 2 and "is too short: 11 tokens, fewer than one window of 256" in e


def test_cli_names_the_bad_field_of_a_plan_or_profile(tiny_dirs, tmp_path, models):
    """A wrong type deep in a plan or profile file: exit 2 and one `error:` line naming the file and field."""
    d = _plan_dict(models)
    d["token_policy"] = {"name": "top-p", "min_k": 1, "max_k": 4, "p": float("nan")}
    plan = tmp_path / "nan.json"
    plan.write_text(json.dumps(d))
    rc, _, e = cli("eval", "--model", tiny_dirs["qwen3_moe"], "--plan", plan, "--out", tmp_path / "e.json")
    lines = [l for l in e.strip().splitlines() if l.startswith("error:")]
    assert rc == 2 and len(lines) == 1, e
    assert lines[0] == f"error: plan {plan}: token_policy.p: must be a finite number in [0.0, 1.0] (a calibrated knob), got nan"
    prof = {"format": "allocmoe-profile", "version": 1, "metric": "kl", "k_values": [1, 2, 3, 4],
            "sensitivity": [[1, 0.5, 0.1, 0], [1, 0.5, "0.1", 0], [1, 0.5, 0.1, 0]], "tokens": 10, "model": d["model"]}
    pf = tmp_path / "prof.json"
    pf.write_text(json.dumps(prof))
    rc, _, e = cli("allocate", "--profile", pf, "--budget", "0.5", "--out", tmp_path / "y.json")
    assert rc == 2 and e.strip() == f"error: profile {pf}: sensitivity[1][2]: must be a finite number, got '0.1'"
