"""Large models on CPU: plans on sharded models (transformers' expert / tensor parallel under torchrun, 2 ranks,
gloo), data-parallel profiling, and offloaded (bigger than memory) models. Every command of the README's
"Large models" section runs here.

torchrun launches cost ~10 s each on a 2-core machine, so each launch does as much as it can: one worker run
covers both families, both sharding modes and every token policy (tests/dist_worker.py).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from allocmoe import distributed, errors
from allocmoe.models import load_model
from allocmoe.testing import invoke_cli, save_tiny

FAMILIES = ["deepseek_v2", "qwen3_moe"]
MODES = ["ep", "tp"]
HERE = Path(__file__).parent


def _worker():
    spec = importlib.util.spec_from_file_location("dist_worker", HERE / "dist_worker.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def torchrun(*args, cwd, nproc=2, timeout=300):
    """`torchrun --standalone --nproc-per-node N ARGS` (CPU, one thread per rank); returns the completed process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def model_dirs(tiny_dir):
    return {f: tiny_dir(f) for f in FAMILIES}


@pytest.fixture(scope="module")
def sharded(model_dirs, tmp_path_factory):
    """rank 0's results of every plan on every (mode, family), from one torchrun launch."""
    out = tmp_path_factory.mktemp("sharded-out")
    torchrun(HERE / "dist_worker.py", "all", out, *model_dirs.values(), cwd=out)
    return {(m, f): torch.load(out / f"{m}-{f}.pt", weights_only=False) for m in MODES for f in FAMILIES}


@pytest.fixture(scope="module")
def single(model_dirs):
    """The same plans in one process, on the same checkpoints."""
    from transformers import AutoModelForCausalLM

    w = _worker()
    return {f: w.run_plans(AutoModelForCausalLM.from_pretrained(d).eval()) for f, d in model_dirs.items()}


# --------------------------------------------------------------------------------------------------
# plans on sharded models
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_plans_on_sharded_model_match_one_process(sharded, single, mode, family):
    r, ref = sharded[(mode, family)], single[family]
    # expert parallel with FSDP: the 2 ranks are data-parallel (each routed the same batch), so global tokens and
    # pairs are twice one process's; activations per token are the same. Tensor parallel: one shared batch.
    dp = 2 if mode == "ep" else 1
    names = [n for n in ref if n not in ("stock", "nopad")]
    assert {"full", "fixed", "global", "threshold", "top-p", "naee"} <= set(names)
    for name in names:
        a, b = r[name], ref[name]
        diff = (a["logits"] - b["logits"]).abs().max().item()
        assert diff <= 1e-5, f"{mode} {family} {name}: max logit difference {diff:.3g}"
        ca, cb = a["counts"], b["counts"]
        for when in ("last", "cumulative"):
            assert ca[when]["activations_per_token"] == pytest.approx(cb[when]["activations_per_token"], abs=0)
            assert ca[when]["activations_per_token_per_layer"] == cb[when]["activations_per_token_per_layer"]
            assert ca[when]["tokens"] == dp * cb[when]["tokens"]
            assert ca[when]["pairs_per_layer"] == [dp * p for p in cb[when]["pairs_per_layer"]]
        assert a["expert_load"] == [[dp * c for c in row] for row in b["expert_load"]]
    assert r["num_experts"] == 8 and r["local_experts"] == (4 if mode == "ep" else 8)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_full_plan_is_the_stock_sharded_model(sharded, single, mode, family):
    r = sharded[(mode, family)]
    assert torch.equal(r["nopad"]["full"], r["nopad"]["stock"])  # no slot dropped: the stock sharded forward
    assert (r["stock"]["logits"] - single[family]["stock"]["logits"]).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_expert_parallel_ranks_compute_only_their_surviving_pairs(sharded, single, family):
    r, ref = sharded[("ep", family)], single[family]
    for name, rows in r["rows_per_rank"].items():
        pairs = sum(ref[name]["counts"]["last"]["pairs_per_layer"])
        # the rows the experts of both ranks ran are exactly the real pairs of both ranks' tokens: each pair
        # once, on the rank owning its expert, and no dropped pair anywhere
        assert sum(rows) == 2 * pairs, name
        assert all(0 < n < 2 * pairs for n in rows), name
    full = sum(r["rows_per_rank"]["full"])
    assert all(sum(r["rows_per_rank"][n]) < full for n in ("fixed", "global", "threshold", "top-p", "naee"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_plan_for_another_model_is_refused_on_a_sharded_model(sharded, mode):
    msg = sharded[(mode, "qwen3_moe")]["mismatch_error"]
    assert msg and "\n" not in msg
    assert "made for another model" in msg and "num_experts is 4 in the plan but 8 in the model" in msg


# --------------------------------------------------------------------------------------------------
# the command line under torchrun: data-parallel profiling (+ resume), sharded eval and generate
# --------------------------------------------------------------------------------------------------


PROFILE_ARGS = ["--tokens", 320, "--seq-len", 16, "--batch-size", 4]  # 20 windows: 5 batches, an idle rank at the end


@pytest.mark.slow
def test_data_parallel_profile_equals_one_process_and_resumes(model_dirs, tmp_path, monkeypatch):
    m = model_dirs["qwen3_moe"]
    assert invoke_cli("profile", "--model", m, "--out", tmp_path / "one.json", *PROFILE_ARGS)[0] == 0
    torchrun("-m", "allocmoe", "profile", "--model", m, "--out", tmp_path / "dp.json", *PROFILE_ARGS, cwd=tmp_path)
    one, dp = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "dp.json").read_text())
    assert dp["tokens"] == one["tokens"] == 20 * 15
    diff = max(abs(a - b) for m_ in ("kl", "loss") for ra, rb in zip(one["metrics"][m_], dp["metrics"][m_])
               for a, b in zip(ra, rb))
    assert diff == 0.0  # batches are added in the same order as one process: the same floats
    assert (tmp_path / "dp.json").read_bytes() == (tmp_path / "one.json").read_bytes()

    # interrupted after its first batch in one process, resumed by 2 ranks: the same profile again
    from transformers import AutoModelForCausalLM

    cls = type(AutoModelForCausalLM.from_pretrained(m))
    real_forward, calls = cls.forward, {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 1 + 3 * 3 + 1:  # batch 1: reference + 3 layers x k=1..3 (k=K=4 is the reference); batch 2's reference
            raise KeyboardInterrupt
        return real_forward(self, *a, **k)

    monkeypatch.setattr(cls, "forward", flaky)
    invoke_cli("profile", "--model", m, "--out", tmp_path / "r.json", *PROFILE_ARGS)  # interrupted
    assert calls["n"] == 11 and not (tmp_path / "r.json").exists()
    monkeypatch.setattr(cls, "forward", real_forward)
    partial = json.loads((tmp_path / "r.json.partial.json").read_text())
    assert 1 <= partial["batches_done"] < 5
    torchrun("-m", "allocmoe", "profile", "--model", m, "--out", tmp_path / "r.json", *PROFILE_ARGS, "--resume",
             cwd=tmp_path)
    assert (tmp_path / "r.json").read_bytes() == (tmp_path / "one.json").read_bytes()
    assert not (tmp_path / "r.json.partial.json").exists()


@pytest.mark.slow
def test_profile_of_an_expert_parallel_model_equals_one_process(model_dirs, tmp_path):
    m = model_dirs["qwen3_moe"]
    assert invoke_cli("profile", "--model", m, "--out", tmp_path / "one.json", *PROFILE_ARGS)[0] == 0
    torchrun("-m", "allocmoe", "profile", "--parallel", "ep", "--model", m, "--out", tmp_path / "ep.json",
             *PROFILE_ARGS, cwd=tmp_path)
    one, ep = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "ep.json").read_text())
    assert ep["tokens"] == one["tokens"] and ep["model"] == one["model"]  # the global fingerprint
    for metric in ("kl", "loss"):
        for ra, rb in zip(one["metrics"][metric], ep["metrics"][metric]):
            assert rb == pytest.approx(ra, rel=1e-5, abs=1e-7)


def _plan(model_dir, tmp_path) -> Path:
    p = tmp_path / "plan.json"
    rc, _, err = invoke_cli("allocate", "--model", model_dir, "--method", "uniform", "--budget", "0.5",
                            "--token-policy", "global", "--out", p)
    assert rc == 0, err
    return p


EVAL_ARGS = ["--seq-len", 32, "--max-tokens", 256, "--max-examples", 3, "--batch-size", 4]


@pytest.mark.slow
@pytest.mark.parametrize("mode,family", [("ep", "deepseek_v2"), ("tp", "qwen3_moe")])
def test_sharded_eval_from_the_command_line(model_dirs, tmp_path, mode, family):
    m = model_dirs[family]
    plan = _plan(m, tmp_path)
    assert invoke_cli("eval", "--model", m, "--plan", plan, "--out", tmp_path / "one.json", *EVAL_ARGS)[0] == 0
    r = torchrun("-m", "allocmoe", "eval", "--parallel", mode, "--model", m, "--plan", plan,
                 "--out", tmp_path / "sharded.json", *EVAL_ARGS, cwd=tmp_path)
    one, sh = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "sharded.json").read_text())
    assert sh["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    assert sh["activations_per_token"] == pytest.approx(one["activations_per_token"], abs=1e-9)
    assert sh["tasks"].keys() == one["tasks"].keys()
    assert r.stderr.count("perplexity ") == 2  # both ranks evaluated; rank 0 wrote


@pytest.mark.slow
def test_sharded_generate_from_the_command_line(model_dirs, tmp_path):
    m = model_dirs["qwen3_moe"]
    plan = _plan(m, tmp_path)
    rc, one, err = invoke_cli("generate", "--model", m, "--plan", plan, "--prompt", "It is a truth",
                              "--max-new-tokens", 6)
    assert rc == 0, err
    r = torchrun("-m", "allocmoe", "generate", "--parallel", "tp", "--model", m, "--plan", plan, "--prompt",
                 "It is a truth", "--max-new-tokens", 6, cwd=tmp_path)
    assert r.stdout.strip() == one.strip()  # greedy text equal, printed once (rank 0)
    line = err[err.index("activations/token"):].split("(")[0]
    assert line == "activations/token 6.00 " and r.stderr.count(line) == 1  # global count, printed by rank 0


def test_expert_parallel_rank_count_must_divide_the_experts(model_dirs, tmp_path, monkeypatch):
    # 3 ranks for 8 experts is refused before anything loads (faked world: no processes are launched)
    monkeypatch.setattr(distributed, "init_from_env", lambda backend=None: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(errors.SettingsError, match="needs a rank count that divides the model's 8 experts"):
        load_model(model_dirs["qwen3_moe"], parallel="ep")
    rc, _, err = invoke_cli("eval", "--model", model_dirs["qwen3_moe"], "--parallel", "ep", "--out", tmp_path / "e")
    assert rc == 2 and err.count("\n") == 1 and "divides the model's 8 experts" in err


def test_parallel_needs_torchrun(model_dirs, tmp_path):
    rc, _, err = invoke_cli("eval", "--model", model_dirs["qwen3_moe"], "--parallel", "tp", "--out", tmp_path / "e")
    assert rc == 2 and "torchrun --nproc-per-node" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------------
# bigger than memory: accelerate's device_map / max_memory / offload
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    """A 4-layer tiny DeepSeek-V2 (layer 0 dense, 1-3 MoE): a decoder layer is ~76 KB, the model ~290 KB."""
    return save_tiny("deepseek_v2", tmp_path_factory.mktemp("deep") / "m", num_layers=4)


CAP = "cpu=150KB"  # one layer fits, the model does not


def test_memory_cap_offloads_layers_to_disk(deep_dir, tmp_path):
    m, _, _ = load_model(deep_dir, max_memory=CAP, offload_dir=tmp_path / "off")
    placed = set(m.hf_device_map.values())
    assert placed == {"cpu", "disk"}
    assert any(p.device.type == "meta" for p in m.parameters())  # offloaded weights are not in memory


def test_offloaded_profile_and_perplexity_equal_in_memory(deep_dir, tmp_path):
    args = ["--model", deep_dir, "--tokens", 256, "--seq-len", 32, "--batch-size", 4]
    assert invoke_cli("profile", *args, "--out", tmp_path / "mem.json")[0] == 0
    rc, _, err = invoke_cli("profile", *args, "--out", tmp_path / "off.json", "--max-memory", CAP,
                            "--offload-dir", tmp_path / "off")
    assert rc == 0, err
    assert invoke_cli("profile", *args, "--out", tmp_path / "auto.json", "--device-map", "auto")[0] == 0
    a, b = json.loads((tmp_path / "mem.json").read_text()), json.loads((tmp_path / "off.json").read_text())
    assert a["metrics"] == b["metrics"] and a["tokens"] == b["tokens"]
    assert json.loads((tmp_path / "auto.json").read_text())["metrics"] == a["metrics"]

    plan = _plan(deep_dir, tmp_path)
    ev = ["--model", deep_dir, "--plan", plan, *EVAL_ARGS]
    assert invoke_cli("eval", *ev, "--out", tmp_path / "e_mem.json")[0] == 0
    assert invoke_cli("eval", *ev, "--out", tmp_path / "e_off.json", "--max-memory", CAP)[0] == 0
    assert invoke_cli("eval", *ev, "--out", tmp_path / "e_auto.json", "--device-map", "auto")[0] == 0
    r = [json.loads((tmp_path / f"e_{n}.json").read_text()) for n in ("mem", "off", "auto")]
    assert r[0]["perplexity"] == r[1]["perplexity"] == r[2]["perplexity"]
    assert r[0]["activations_per_token"] == r[1]["activations_per_token"] == 6.0
    rc, text, err = invoke_cli("generate", "--model", deep_dir, "--plan", plan, "--prompt", "Hello",
                               "--max-new-tokens", 4, "--max-memory", CAP)
    rc0, text0, _ = invoke_cli("generate", "--model", deep_dir, "--plan", plan, "--prompt", "Hello",
                               "--max-new-tokens", 4)
    assert rc == rc0 == 0 and text == text0


@pytest.mark.slow
def test_offloaded_run_job(model_dirs, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 40)
    rc, _, err = invoke_cli("run", "--model", model_dirs["deepseek_v2"], "--out", tmp_path / "run", "--budgets", "0.5",
                            "--calibration-tokens", 512, "--eval-tokens", 256, "--seq-len", 64, "--data", text,
                            "--calibration-data", text, "--task-examples", 2, "--no-speed", "--max-memory", CAP)
    assert rc == 0, err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["configs"]


def test_memory_cap_too_small_for_one_layer_is_one_line(deep_dir, tmp_path):
    rc, _, err = invoke_cli("profile", "--model", deep_dir, "--out", tmp_path / "p.json", "--max-memory", "cpu=20KB")
    assert rc == 2 and err.count("\n") == 1
    assert "too small to load even one layer" in err and "--max-memory" in err
    rc, _, err = invoke_cli("eval", "--model", deep_dir, "--out", tmp_path / "e.json", "--max-memory", "lots")
    assert rc == 2 and "not a size" in err
