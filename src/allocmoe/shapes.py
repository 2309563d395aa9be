"""Random-weight models with the dimensions of real MoE checkpoints, for speed measurements offline.

    build_shape("deepseek-v2-lite")      # 4 decoder layers (1 dense + 3 MoE), fp32
    build_shape("deepseek-v2-lite:8", dtype=torch.bfloat16)
    build_shape("qwen3-30b-a3b")         # 2 of Qwen3-30B-A3B's 48 layers (128 experts, top-8)

The hub is unreachable here, so the benchmark cannot load DeepSeek-V2-Lite itself. What a speed
measurement needs is the *shape* of the compute: the same hidden size, the same routed and shared
experts with the same matrix sizes, the same top-k, the same MLA attention dimensions and the same
vocabulary (LM head). Only the number of decoder layers is cut (default 4 of the real 27) so the model
fits in memory; the per-layer cost is unchanged, the LM head's share of the step is larger.

Weights are random (seeded). Router weights are drawn with a larger standard deviation than the
default init so routing is not uniform (as in `allocmoe.testing`): with the default init the router
logits are ~0.02 * sqrt(hidden) and every expert gets nearly the same probability.
"""

from __future__ import annotations

import math

import torch

from .errors import SettingsError

# DeepSeek-V2-Lite (deepseek-ai/DeepSeek-V2-Lite config.json), except num_hidden_layers (27 there) and the
# YaRN rope scaling (irrelevant to speed at these sequence lengths).
DEEPSEEK_V2_LITE = dict(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2,
    num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
    qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, routed_scaling_factor=1.0,
    topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False, hidden_act="silu",
    max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=100000,
    eos_token_id=100001, pad_token_id=None,
)

# Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B config.json), except num_hidden_layers (48 there) and the context length
# (40960 there; irrelevant to speed at these sequence lengths). One layer's experts are 604M parameters.
QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[], hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-6,
    rope_theta=1000000.0, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
)

SHAPES = {"deepseek-v2-lite": (DEEPSEEK_V2_LITE, 27, 4),  # name: (config, real layers, default layers)
          "qwen3-30b-a3b": (QWEN3_30B_A3B, 48, 2)}
# name: (transformers config class, architecture)
SHAPE_CLASSES = {"deepseek-v2-lite": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
            "qwen3-30b-a3b": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM")}


def parse_shape(spec: str) -> tuple[str, int]:
    """'deepseek-v2-lite[:LAYERS]' -> (name, layers)."""
    if not isinstance(spec, str) or not spec.strip():
        raise SettingsError(f"unknown shape {spec!r}; choose from {', '.join(s + '[:LAYERS]' for s in SHAPES)}")
    name, _, layers = spec.strip().partition(":")
    name = name.lower()
    if name not in SHAPES:
        raise SettingsError(f"unknown shape {name!r}; choose from {', '.join(s + '[:LAYERS]' for s in SHAPES)}")
    cfg, real, default = SHAPES[name]
    if not layers:
        return name, default
    try:
        n = int(layers)
    except ValueError:
        raise SettingsError(f"shape {spec!r}: LAYERS must be an integer, got {layers!r}") from None
    lo = cfg.get("first_k_dense_replace", 0) + 1
    if not lo <= n <= real:
        raise SettingsError(f"shape {spec!r}: LAYERS must be between {lo} (at least one MoE layer) and {real}")
    return name, n


def shape_config(spec: str):
    import transformers as tf

    name, layers = parse_shape(spec)
    cfg = dict(SHAPES[name][0], num_hidden_layers=layers)
    cls, arch = SHAPE_CLASSES[name]
    config = getattr(tf, cls)(**cfg)
    config.architectures = [arch]
    config._name_or_path = f"shape:{name}:{layers}"
    return config


def build_shape(spec: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                router_scale: float = 2.0, init_std: float = 0.02) -> torch.nn.Module:
    """A DeepseekV2ForCausalLM with random weights and the real dimensions of `spec`, in eval mode.

    The module tree is built on the meta device (no memory, no slow default init), then materialised on
    `device` in `dtype` and filled in place: matrices ~ N(0, init_std), norms 1, biases 0, router
    weights ~ N(0, router_scale / sqrt(hidden)) so the router logits have a spread of about
    `router_scale` (the router input is RMS-normalised). Deterministic for a seed.
    """
    config = shape_config(spec)
    if isinstance(dtype, str):
        from .models import DTYPES

        if dtype not in DTYPES or dtype == "auto":
            raise SettingsError(f"unknown dtype {dtype!r} (choose float32, bfloat16 or float16)")
        dtype = DTYPES[dtype]
    try:
        return random_model(config, seed=seed, dtype=dtype, device=device, router_scale=router_scale,
                            init_std=init_std)
    except (RuntimeError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SettingsError(f"cannot build shape {spec!r} on {device}: {msg}") from None


def random_model(config, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 router_scale: float = 2.0, init_std: float = 0.02) -> torch.nn.Module:
    """Any causal-LM config -> model with seeded random weights, built on meta then materialised (fast)."""
    import transformers as tf

    from .adapters import find_moe_layers

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    routers = {id(l.router) for l in find_moe_layers(model)}
    with torch.no_grad():
        for mod in model.modules():
            for p_name, p in mod.named_parameters(recurse=False):
                if id(mod) in routers and p_name == "weight":
                    p.normal_(0.0, router_scale / math.sqrt(p.shape[-1]), generator=g)
                elif "norm" in type(mod).__name__.lower() or "norm" in p_name:
                    p.fill_(1.0)
                elif p.dim() == 1:
                    p.zero_()
                else:
                    p.normal_(0.0, init_std, generator=g)
        # non-persistent buffers (rotary inv_freq) hold garbage after to_empty: rebuild them off meta
        for name, mod in list(model.named_modules()):
            if type(mod).__name__.endswith("RotaryEmbedding"):
                fresh = type(mod)(config=mod.config).to(device)
                for b_name, b in fresh.named_buffers(recurse=False):
                    setattr(mod, b_name, b)
                for attr in ("attention_scaling", "max_seq_len_cached", "original_max_seq_len"):
                    if hasattr(fresh, attr):
                        setattr(mod, attr, getattr(fresh, attr))
        for name, b in model.named_buffers():
            if b.is_meta:
                raise SettingsError(f"buffer {name} was not materialised")
    return model.eval()
