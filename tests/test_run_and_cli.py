"""The main job's report files, refusal to overwrite, and the eval/generate commands (tiny model, fast)."""

import json
import subprocess
import sys

import pytest

from allocmoe.run import RunSettings, run
from allocmoe.testing import invoke_cli

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. ") * 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("run")
    model = tiny_dir("deepseek_v2")
    (d / "text.txt").write_text(TEXT)
    (d / "ood.txt").write_text("ABASEMENT, n. A decent and customary mental attitude in the presence of wealth. " * 20)
    task = {"name": "toy", "examples": [{"input": "a single", "target_scores": {"man": 1, "dog": 0}},
                                         {"input": "a good", "target_scores": {"fortune": 1, "wife": 0}}]}
    (d / "task.json").write_text(json.dumps(task))
    return d, model


def test_run_writes_well_formed_report(setup, monkeypatch):
    d, model = setup
    import allocmoe.run as R

    evaluated = []  # plans the job evaluated: each computation once (equal execution keys share results)

    def counting(model, tok, plan, *a, **kw):
        evaluated.append(plan)
        return real(model, tok, plan, *a, **kw)

    real = R.evaluate_config
    monkeypatch.setattr(R, "evaluate_config", counting)
    s = RunSettings(budgets=[0.5, 0.75], calibration_tokens=512, policy_calibration_tokens=512, eval_tokens=512,
                    seq_len=64, data=[str(d / "text.txt")], calibration_data=[str(d / "text.txt")],
                    tasks=[str(d / "task.json")], speed=False, ood_data=[str(d / "ood.txt")], ood_tokens=256,
                    policy_aware=True)  # the opt-in policy-aware ablation row too
    out = d / "out"
    res = run(model, out, s)
    for f in ("results.json", "report.md", "frontier.png", "allocation.png", "profile_at_0.5.json",
              "profile_at_0.75.json"):
        assert (out / f).stat().st_size > 0
    # Alloc-L's plans at each budget come from that budget's operating-point profile (issue 19)
    for b in (0.5, 0.75):
        op = json.loads((out / f"profile_at_{b}.json").read_text())["operating_point"]
        assert float(op["at"]) == b and len(op["around"]) == 2 and op["rounds"] >= 1
    assert not (out / "profile.json").exists()
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = json.loads((out / "results.json").read_text())
    labels = {c["label"] for c in r["configs"]}
    assert {"full model", "uniform", "random", "top-p", "naee", "lexi", "Alloc-L (dp)",
            "Alloc-L + Alloc-T (dp+global)", "Alloc-L + threshold (dp+threshold)"} <= labels
    full = next(c for c in r["configs"] if c["method"] == "full")
    assert full["activations_per_token"] == 8
    for c in r["configs"]:
        if c["method"] != "full" and c["policy"] in ("fixed", "global"):
            assert c["activations_per_token"] == sum(c["ks"])  # measured counts meet the plan exactly
        # 2 examples cannot be above chance beyond noise: scored for the full model only, then left out
        assert ("toy" in c.get("tasks", {})) == (c["method"] == "full")
        # every configuration is also measured out of domain, with its own measured activations
        assert c["ood"]["tokens"] == 256 and c["ood"]["perplexity"] > 1
        if c["policy"] == "fixed":
            assert c["ood"]["activations_per_token"] == sum(c["ks"])
    md = (out / "report.md").read_text()
    assert "## Budget 0.5 of the original" in md and "Alloc-L (dp)" in md and "OOD Δppl" in md
    assert r["settings"]["tasks_at_chance"] == ["toy"] and "toy acc |" not in md
    assert "- left out (the full model scores them at chance" in md and "toy (acc" in md
    # 10 configurations at each budget (9 from the registries + dp+global+comp) and 5 ablation ones at 0.5
    assert len(list((out / "plans").glob("*.json"))) == 2 * 10 + 5
    assert len(list((out / "plans").glob("*.compensation.safetensors"))) == 2 + 2
    comp = [c for c in r["configs"] if c.get("compensated")]
    assert len(comp) == 4
    from allocmoe.run import plan_file_stem

    for c in comp:  # measured compensation work exactly where the plan kept maps (none may help a random model)
        kept = json.loads((out / "plans" / f"{plan_file_stem(c['label'], c['budget'])}.json").read_text())[
            "compensation"].get("kept_layers")
        assert (c["compensation"]["macs_per_token"] > 0) == (kept is None or len(kept) > 0)
    assert "## Ablation at budget 0.5" in md and "search + Alloc-T + comp" in md
    assert (out / "profile_global.json").exists()
    # Alloc-L's input, every MoE layer with the spread between the most and least sensitive
    sec = md[md.index("## Per-layer sensitivity"):].split("\n## ")[0]
    assert "most sensitive MoE layer" in sec and "spread" in sec and "budget 0.5's allocation" in sec
    assert [ln.split("|")[1].strip() for ln in sec.splitlines() if ln.startswith("| ") and "MoE layer" not in ln] \
        == [str(i) for i in range(len(r["profile"]["sensitivity"]))]
    assert res["configs"] == r["configs"]
    keys = [R.execution_key(p) for p in evaluated if p is not None]
    assert len(keys) == len(set(keys)) and len(evaluated) <= len(r["configs"])
    by_plan = {}
    for c in r["configs"][1:]:
        by_plan.setdefault((json.dumps(c["ks"]), json.dumps(c["token_policy"], sort_keys=True), c["compensated"]),
                           set()).add(tuple(c["window_nll"]))
    assert all(len(v) == 1 for k, v in by_plan.items() if k[2] is False)  # same computation, same figures
    # refuses to write into a non-empty directory without --force
    from allocmoe.errors import OutputExistsError

    with pytest.raises(OutputExistsError, match="is not empty; refusing to overwrite"):
        run(model, out, s)


def console_script(*args, cwd=None):
    """The installed entry point in a child process (most CLI tests run in-process with `invoke_cli`)."""
    return subprocess.run([sys.executable, "-m", "allocmoe.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_console_script_refuses_non_empty_dir(setup, tmp_path):
    d, model = setup
    (tmp_path / "keep.txt").write_text("mine")
    r = console_script("run", "--model", model, "--out", tmp_path)
    assert r.returncode == 2 and "is not empty; refusing to overwrite its files (pass --force to overwrite)" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_cli_eval_and_generate(setup, tmp_path):
    d, model = setup
    plan = tmp_path / "plan.json"
    assert invoke_cli("allocate", "--model", model, "--method", "uniform", "--budget", "4", "--out", plan)[0] == 0
    rc, out, err = invoke_cli("eval", "--model", model, "--plan", plan, "--data", d / "text.txt", "--task",
                              d / "task.json", "--seq-len", "64", "--out", tmp_path / "eval.json")
    assert rc == 0, err
    e = json.loads((tmp_path / "eval.json").read_text())
    assert e["activations_per_token"] == 4 and e["perplexity"] > 1 and e["tasks"]["toy"]["n"] == 2
    rc, out, err = invoke_cli("generate", "--model", model, "--plan", plan, "--prompt", "It is a",
                              "--max-new-tokens", "5")
    assert rc == 0, err
    assert out.startswith("It is a") and "activations/token 4.00" in err


@pytest.mark.parametrize("args, names", [
    (["eval", "--out", "x.json", "--max-examples", "0"], "--max-examples"),
    (["eval", "--out", "x.json", "--batch-size", "abc"], "--batch-size"),
    (["info", "--bogus"], "--bogus"),
    (["run", "--policy-aware", "--no-ablation"], "--no-ablation"),
    (["run", "--eval-tokens", "10"], "--eval-tokens"),
    (["run", "--threads", "0"], "--threads"),
    (["run", "--profile-at", "nope"], "--profile-at"),
])
def test_cli_usage_errors_are_short_and_name_the_option(args, names, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = invoke_cli(*args)
    assert rc == 2
    assert names in err and "Traceback" not in err
    lines = err.strip().splitlines()  # usage errors too are one `error:` line, pointing at the command's help
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert not (tmp_path / "x.json").exists()


def test_execution_key_names_what_a_plan_computes():
    import allocmoe
    from allocmoe.run import execution_key
    from allocmoe.testing import tiny_model

    m = tiny_model("qwen3_moe")
    n = len(allocmoe.find_moe_layers(m))
    a = allocmoe.make_plan(m, [2] * n, method="uniform")
    b = allocmoe.make_plan(m, [2] * n, method="dp")
    b.meta["guard"] = {"chosen": "uniform"}
    assert execution_key(a) == execution_key(b)  # method and notes do not change the computation
    assert execution_key(a) != execution_key(allocmoe.make_plan(m, [1] + [2] * (n - 1)))
    assert execution_key(a) != execution_key(allocmoe.make_plan(m, [2] * n, token_policy="global"))


def test_sensitivity_table_at_an_operating_point_shows_the_marginal_gain():
    from allocmoe.report import sensitivity_table

    # around [2, 1, 2]: S[l][a_l] is the whole allocation's KL (0.6, 0.9, 0.7); one activation more gains
    # 0.6 - 0.5, 0.9 - 0.5 and 0.7 - 0.5
    S = [[0.9, 0.6, 0.5, 0.4], [0.9, 0.5, 0.3, 0.2], [1.0, 0.7, 0.5, 0.3]]
    r = {"model": {"top_k": 4}, "profile": {"k_values": [1, 2, 3, 4], "sensitivity": S, "metric": "kl",
                                            "tokens": 64, "operating_point": {"at": "0.5", "around": [2, 1, 2]}}}
    text = "\n".join(sensitivity_table(r))
    assert "one activation more" in text
    assert "most sensitive MoE layer 1 (0.4), least 0 (0.1), spread **4.0x**" in text
    r["profile"]["operating_point"]["around"] = [2, 4, 2]  # layer 1 has no k above its own: half-K costs
    text = "\n".join(sensitivity_table(r))
    assert "Cost at k=2: most sensitive MoE layer 2 (0.7), least 1 (0.5)" in text


def test_above_chance_needs_more_than_noise():
    from allocmoe.evaluation import above_chance

    assert not above_chance({"accuracy": 0.549, "chance": 0.5, "n": 51})  # cause_and_effect on the built-in model
    assert not above_chance({"accuracy": 0.5, "chance": 0.5, "n": 200})
    assert above_chance({"accuracy": 0.58, "chance": 0.5, "n": 200})  # 0.5 + 2 * 0.035 = 0.571
    assert not above_chance({"accuracy": 1.0, "chance": 0.5, "n": 0})
