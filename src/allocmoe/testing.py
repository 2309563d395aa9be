"""Tiny random-weight models of every supported family, built from the real transformers config classes.

Used by the test-suite and by `allocmoe` demos. Router weights are scaled up after init: with the
default init, tiny models route almost uniformly and every selection question becomes a coin toss.
"""

from __future__ import annotations

import torch
import transformers as tf

from .adapters import find_moe_layers

FAMILIES = ["deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "gpt_oss", "granitemoe"]

_COMMON = dict(vocab_size=100, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_config(family: str, num_layers: int = 3, num_experts: int = 8, top_k: int = 4, vocab_size: int = 100,
                max_position_embeddings: int = 128):
    c = dict(_COMMON, num_hidden_layers=num_layers, vocab_size=vocab_size, max_position_embeddings=max_position_embeddings)
    if family.startswith("deepseek"):
        c["num_key_value_heads"] = c["num_attention_heads"]  # MLA: one latent KV per head
    if family == "deepseek_v2":
        return tf.DeepseekV2Config(**c, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=num_experts,
                                   num_experts_per_tok=top_k, n_shared_experts=1, first_k_dense_replace=1,
                                   kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                   v_head_dim=8, routed_scaling_factor=1.0, topk_method="greedy", n_group=1,
                                   topk_group=1)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(**c, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=num_experts,
                                   num_experts_per_tok=top_k, n_shared_experts=1, first_k_dense_replace=1,
                                   kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                   v_head_dim=8, routed_scaling_factor=2.5, n_group=4, topk_group=2,
                                   norm_topk_prob=True)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**c, intermediate_size=48, moe_intermediate_size=16, num_experts=num_experts,
                                 num_experts_per_tok=top_k, shared_expert_intermediate_size=32,
                                 mlp_only_layers=[1], norm_topk_prob=False)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**c, intermediate_size=48, moe_intermediate_size=16, num_experts=num_experts,
                                 num_experts_per_tok=top_k, norm_topk_prob=True, head_dim=8)
    if family == "olmoe":
        return tf.OlmoeConfig(**c, intermediate_size=16, num_experts=num_experts, num_experts_per_tok=top_k)
    if family == "mixtral":
        return tf.MixtralConfig(**c, intermediate_size=16, num_local_experts=num_experts, num_experts_per_tok=top_k)
    if family == "gpt_oss":
        return tf.GptOssConfig(**c, intermediate_size=16, num_local_experts=num_experts, num_experts_per_tok=top_k,
                               head_dim=8, sliding_window=16,
                               layer_types=(["sliding_attention", "full_attention"] * num_layers)[:num_layers])
    if family == "granitemoe":
        return tf.GraniteMoeConfig(**c, intermediate_size=16, num_local_experts=num_experts,
                                   num_experts_per_tok=top_k)
    raise ValueError(f"unknown family {family}")


def tiny_model(family: str, seed: int = 0, router_scale: float = 8.0, **kw) -> torch.nn.Module:
    """A tiny random model in eval mode with sharpened routers (deterministic for a seed)."""
    cfg = tiny_config(family, **kw)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for layer in find_moe_layers(model):
            w = layer.router.weight
            w.normal_(0, router_scale / w.shape[1] ** 0.5)
            bias = getattr(layer.router, "e_score_correction_bias", None)
            if bias is not None:
                bias.uniform_(-0.1, 0.1)
    return model.eval()


def tiny_tokenizer():
    """A character-level fast tokenizer (99 ids) matching the tiny models' vocabulary, built offline."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def bpe_tokenizer(corpus: list[str], bos: bool = True, vocab_size: int = 300):
    """A byte-level BPE (about `vocab_size` tokens) trained on `corpus`, built offline: unlike tiny_tokenizer it
    has multi-byte tokens and splits UTF-8 characters. With `bos=False` it has no BOS token at all."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    extra = {"bos_token": "<|bos|>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>", **extra)


def save_tiny(family: str, path, **kw) -> str:
    """Save a tiny model + tokenizer as a standard Hugging Face directory (for CLI tests)."""
    model = tiny_model(family, **kw)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def invoke_cli(*args) -> tuple[int, str, str]:
    """Run `allocmoe ARGS...` in this process (typer's CliRunner isolation): (exit code, stdout, stderr)."""
    import sys

    from typer.testing import CliRunner

    from .cli import run_cli

    with CliRunner().isolation() as (out, err, _):
        rc = run_cli([str(a) for a in args])
        sys.stdout.flush()
        sys.stderr.flush()
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return rc, stdout, stderr
