"""Tiny random models for the vLLM tests, built in the main environment (transformers 5.24) and saved as
standard Hugging Face directories that vLLM (transformers 5.19 in its own environment) loads."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
import transformers as tf

import allocmoe

ASSETS = Path(allocmoe.__file__).parent / "assets" / "default_model"


def tiny_qwen3_moe_config(num_layers: int = 4, num_experts: int = 32, top_k: int = 8) -> "tf.Qwen3MoeConfig":
    cfg = tf.Qwen3MoeConfig(
        vocab_size=8192, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_experts=num_experts, num_experts_per_tok=top_k,
        norm_topk_prob=True, max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    return cfg


def save_tiny_qwen3_moe(path, seed: int = 0, router_scale: float = 4.0, init_std: float = 0.05,
                        expert_std: float = 0.2, **kw) -> str:
    """A tiny random Qwen3-MoE (fp32) with sharpened routers, plus the built-in model's tokenizer."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_qwen3_moe_config(**kw), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # a sharper LM head than the default init: greedy picks are not near-ties
                # the routed experts weigh enough that a per-layer plan changes the greedy output
                p.normal_(0, 0.5 if name.startswith("lm_head") else expert_std if ".experts." in name else init_std)
        for layer in allocmoe.find_moe_layers(model):
            w = layer.router.weight
            w.normal_(0, router_scale / math.sqrt(w.shape[1]))
    model.eval().save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / f, Path(path) / f)
    return str(path)
