"""The shipped default model (a tiny trained DeepSeek-V2 MoE) and the shipped text splits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parents[1] / "src" / "allocmoe" / "assets"
MODEL_DIR = ASSETS / "default_model"
DATA_DIR = ASSETS / "data"
EOT = "<|endoftext|>"

needs_checkpoint = pytest.mark.skipif(
    not ((MODEL_DIR / "config.json").exists() and (MODEL_DIR / "model.safetensors").exists()),
    reason=f"default model checkpoint not present in {MODEL_DIR} (run scripts/train_default_model.py train)",
)


@pytest.mark.parametrize("split", ["validation", "calibration"])
def test_shipped_text_splits(split):
    p = DATA_DIR / f"{split}.txt"
    assert p.is_file()
    size = p.stat().st_size
    assert 100_000 < size < 1_000_000
    text = p.read_text(encoding="utf-8")
    # markup stripped: no OSIS/ThML/HTML tags (a bare "<" is legitimate: the Jargon File quotes C code)
    assert text.strip() and not re.search(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?>", text)


def test_shipped_splits_disjoint():
    val = set((DATA_DIR / "validation.txt").read_text(encoding="utf-8").split("\n\n"))
    cal = set((DATA_DIR / "calibration.txt").read_text(encoding="utf-8").split("\n\n"))
    assert not (val & cal)


def test_sources_documented():
    text = (DATA_DIR / "SOURCES.md").read_text(encoding="utf-8")
    for pkg in ("r-cran-janeaustenr", "sword-text-web", "sword-text-kjv", "sword-comm-tdavid", "sword-comm-mhcc",
                "sword-comm-scofield", "dict-jargon", "dict-devil", "dict-wn"):
        assert pkg in text


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    m.eval()
    return m


@needs_checkpoint
def test_checkpoint_files_and_config():
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v2"
    assert cfg["architectures"] == ["DeepseekV2ForCausalLM"]
    assert cfg["first_k_dense_replace"] == 1
    assert cfg["num_experts_per_tok"] == 6
    assert 32 <= cfg["n_routed_experts"] <= 64
    assert cfg["topk_method"] == "greedy" and cfg["norm_topk_prob"] is False
    assert cfg["dtype"] in ("bfloat16", "float16")
    assert cfg["num_hidden_layers"] - cfg["first_k_dense_replace"] >= 12  # deep like the models users run
    assert cfg["n_shared_experts"] == 2
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 80 * 1000 * 1000
    assert (MODEL_DIR / "TRAINING.md").is_file()


@needs_checkpoint
def test_tokenizer_loads_and_roundtrips(tok):
    assert tok.eos_token == tok.bos_token == tok.pad_token == EOT
    assert len(tok) == json.loads((MODEL_DIR / "config.json").read_text())["vocab_size"]
    text = "It is a truth universally acknowledged, that a single man — “in possession” of a good fortune."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2.5  # a trained BPE, not bytes


@needs_checkpoint
def test_default_model_forward_is_finite_and_sensible(tok, model):
    from transformers import DeepseekV2ForCausalLM

    assert isinstance(model, DeepseekV2ForCausalLM)
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    assert len(gates) == model.config.num_hidden_layers - 1 and all(g.top_k == 6 for g in gates)
    text = "And God said, Let there be light: and there was light. Emma Woodhouse, handsome, clever, and rich,"
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(out.logits).all()
    # trained: far better than uniform guessing over the vocabulary (ln 8192 = 9.0)
    assert out.loss.item() < 6.0


@needs_checkpoint
def test_default_model_loads_in_stored_dtype():
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    assert next(m.parameters()).dtype in (torch.bfloat16, torch.float16)
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits.float()).all()


@pytest.mark.slow
@needs_checkpoint
def test_half_budget_costs_perplexity(model, tok):
    """What makes the model a testbed: uniform top-ceil(K/2) in every MoE layer (the `fixed` policy, run
    through allocmoe.apply, so really half the routed matmuls) must cost validation perplexity. The shipped
    model costs +6.7% on the first 8k tokens of the validation split (TRAINING.md has the whole split);
    at least 5% is required (the previous, 6-MoE-layer model cost +4.6% on its own split and was held to 3%)."""
    import math

    import allocmoe
    from allocmoe.evaluation import perplexity

    text = (DATA_DIR / "validation.txt").read_text(encoding="utf-8")
    full = perplexity(model, tok, text, max_tokens=8192, progress=False)["perplexity"]
    k = model.config.num_experts_per_tok
    n_moe = len(allocmoe.find_moe_layers(model))
    plan = allocmoe.make_plan(model, [math.ceil(k / 2)] * n_moe)
    with allocmoe.apply(model, plan) as h:
        half = perplexity(model, tok, text, max_tokens=8192, progress=False)["perplexity"]
        assert h.counts()["cumulative"]["activations_per_token"] == pytest.approx(n_moe * math.ceil(k / 2))
    assert half / full - 1 >= 0.05
