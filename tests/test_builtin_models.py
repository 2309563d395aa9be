"""The built-in models: `builtin:NAME` selects one, no model means the first (DeepSeek-V2)."""

import json

import pytest

from allocmoe.errors import ModelLoadError
from allocmoe.models import BUILTIN_MODELS, DEFAULT_BUILTIN, builtin_model_dir, resolve
from allocmoe.testing import invoke_cli

QWEN = builtin_model_dir("qwen3-moe")


def test_default_is_the_deepseek_model_and_names_resolve():
    assert DEFAULT_BUILTIN == "deepseek-v2" and list(BUILTIN_MODELS)[0] == DEFAULT_BUILTIN
    assert resolve(None) == resolve("builtin:deepseek-v2") == str(builtin_model_dir("deepseek-v2"))
    assert resolve("builtin:qwen3-moe") == str(QWEN)
    with pytest.raises(ModelLoadError, match=r"unknown built-in model builtin:nope \(choose from builtin:deepseek-v2, "
                                             r"builtin:qwen3-moe\)"):
        resolve("builtin:nope")


def test_qwen3_moe_checkpoint_shape():
    """Issue 20's spec: stock Qwen3-MoE, >= 12 MoE layers, 64-128 experts, top-8, renormalised, no shared
    experts, <= 80 MB in bf16, the same tokenizer as the default model."""
    cfg = json.loads((QWEN / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["model_type"] == "qwen3_moe"
    moe_layers = [i for i in range(cfg["num_hidden_layers"]) if i not in cfg.get("mlp_only_layers", [])
                  and (i + 1) % cfg["decoder_sparse_step"] == 0]
    assert len(moe_layers) >= 12
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))  # transformers 5.24 saves the latter
    assert 64 <= experts <= 128 and cfg["num_experts_per_tok"] == 8 and cfg["norm_topk_prob"] is True
    assert not cfg.get("shared_expert_intermediate_size") and cfg["dtype"] == "bfloat16"
    assert sum(f.stat().st_size for f in QWEN.glob("*.safetensors")) <= 80e6
    assert (QWEN / "tokenizer.json").read_bytes() == (builtin_model_dir() / "tokenizer.json").read_bytes()


def test_info_on_each_builtin_model():
    for name, arch, k in (("builtin:deepseek-v2", "DeepseekV2ForCausalLM", 6), ("builtin:qwen3-moe", "Qwen3MoeForCausalLM", 8)):
        rc, out, err = invoke_cli("info", "--model", name, "--json")
        assert rc == 0, err
        info = json.loads(out)
        assert info["architecture"] == arch and info["top_k"] == k and info["moe_layers"] >= 12
    rc, out, err = invoke_cli("info", "--model", "builtin:nope")
    assert rc == 2 and err.strip().splitlines() == [err.strip()] and err.startswith("error: unknown built-in model")
