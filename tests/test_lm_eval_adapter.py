import json
import math
import shutil
from pathlib import Path

import pytest
import torch

try:
    import lm_eval  # noqa: F401
    from lm_eval.models.huggingface import HFLM  # noqa: F401  (needs accelerate too)
except ImportError as e:
    pytest.skip(f"lm-eval is not importable ({e}); pip install 'allocmoe[lm-eval]'", allow_module_level=True)

from allocmoe.errors import AllocMoeError
from allocmoe.lm_eval_adapter import run_lm_eval
from allocmoe.testing import bpe_tokenizer, tiny_model

TASK_DIR = Path(__file__).parent / "data" / "lm_eval_task"


def tiny_model_and_tokenizer():
    """A tiny Qwen3-MoE and a byte-level BPE trained on the toy task's questions and choices."""
    docs = [json.loads(line) for line in (TASK_DIR / "toy_mc.jsonl").read_text().splitlines()]
    tokenizer = bpe_tokenizer([d["question"] + " " + c for d in docs for c in d["choices"]])
    return tiny_model("qwen3_moe", num_layers=2, num_experts=4, top_k=2, vocab_size=300), tokenizer


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No hub access, datasets cache in tmp_path, and cwd = a copy of the task folder (its data_files path is
    relative; running outside the repo also keeps lm-eval's `git describe` off it)."""
    import datasets
    import huggingface_hub

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    # both libraries read these at import time, which may have happened already
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    work = tmp_path / "task"
    shutil.copytree(TASK_DIR, work)
    monkeypatch.chdir(work)
    return work


def test_run_lm_eval_offline_local_task(offline):
    model, tokenizer = tiny_model_and_tokenizer()
    out = run_lm_eval(model, tokenizer, ["allocmoe_toy_mc"], include_path=str(offline), batch_size=4)
    json.dumps(out)  # JSON-serialisable as returned
    res = out["results"]["allocmoe_toy_mc"]
    assert 0 <= res["acc,none"] <= 1 and 0 <= res["acc_norm,none"] <= 1
    assert out["n-samples"]["allocmoe_toy_mc"]["effective"] == 5
    assert out["config"]["limit"] is None

    # the same number by hand: acc = argmax of the summed log-likelihood of " " + choice after the question
    # (this tokenizer has no post-processor, so lm-eval adds no BOS)
    docs = [json.loads(line) for line in (offline / "toy_mc.jsonl").read_text().splitlines()]
    hits = 0
    with torch.no_grad():
        for d in docs:
            ctx = tokenizer(d["question"], add_special_tokens=False)["input_ids"]
            lls = []
            for c in d["choices"]:
                whole = tokenizer(d["question"] + " " + c, add_special_tokens=False)["input_ids"]
                lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
                lls.append(sum(lp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
            hits += max(range(len(lls)), key=lls.__getitem__) == d["answer"]
    assert math.isclose(res["acc,none"], hits / len(docs))

    out = run_lm_eval(model, tokenizer, ["allocmoe_toy_mc"], include_path=str(offline), limit=2)
    assert out["n-samples"]["allocmoe_toy_mc"]["effective"] == 2


def test_run_lm_eval_unknown_task(offline, monkeypatch):
    from lm_eval.tasks import TaskManager

    # an unknown name makes run_lm_eval index lm-eval's ~15k built-in tasks (~10 s); skip them here
    init = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "include_defaults": False}))
    model, tokenizer = tiny_model_and_tokenizer()
    with pytest.raises(AllocMoeError, match="unknown lm-eval task"):
        run_lm_eval(model, tokenizer, ["no_such_task_xyz"], include_path=str(offline))
