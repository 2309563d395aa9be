"""Loading models: the built-in default checkpoint, a local Hugging Face directory, or a hub id.

The real `from_pretrained` paths are used for everything; the built-in model is just a local directory
that ships inside the package (found with importlib.resources, so it works from an installed wheel).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError, SettingsError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def default_model_dir() -> Path:
    return Path(str(resources.files("allocmoe") / "assets" / "default_model"))


def resolve(spec: str | os.PathLike | None) -> str:
    """A local directory path (absolute) or a hub id. None means the built-in model."""
    if spec is None or str(spec) in ("", "default", "builtin"):
        d = default_model_dir()
        if not (d / "config.json").exists():
            raise ModelLoadError(f"the built-in model is missing from {d} (reinstall allocmoe or give a model)", param="model")
        return str(d)
    s = str(spec)
    p = Path(s).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{p} is not a Hugging Face model directory (no config.json)")
        return str(p.resolve())
    if s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise ModelLoadError(f"model directory {s} does not exist")
    return s  # a hub id


def local_path(spec: str | os.PathLike | None) -> str:
    """The local directory the model is (or would be) loaded from; hub ids resolve via the HF cache."""
    ref = resolve(spec)
    if Path(ref).exists():
        return ref
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"])
    except Exception as e:  # network down, unknown repo, gated...
        raise ModelLoadError(f"cannot fetch model {ref!r} from the hub ({type(e).__name__}); "
                            "give a local model directory", param="model") from None


def _hub_error(ref: str, e: Exception) -> ModelLoadError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ModelLoadError(f"cannot load model {ref!r}: {msg}")


def load_config(spec: str | os.PathLike | None):
    from transformers import AutoConfig

    path = local_path(spec)
    try:
        return AutoConfig.from_pretrained(path), path
    except Exception as e:
        raise _hub_error(path, e) from None


def load_model(spec: str | os.PathLike | None = None, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer, path): eval mode, weights loaded with `AutoModelForCausalLM.from_pretrained`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = local_path(spec)
    if dtype not in DTYPES:
        raise SettingsError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})", param="dtype")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    except Exception as e:
        raise _hub_error(path, e) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:
        tokenizer = None  # some checkpoints ship without one; commands that need text say so
    return model, tokenizer, path


def load_skeleton(spec: str | os.PathLike | None = None) -> tuple[nn.Module, str]:
    """The model's module structure on the meta device: no weights read, so huge models are instant."""
    from transformers import AutoModelForCausalLM

    config, path = load_config(spec)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise _hub_error(path, e) from None
    return model, path


def parameter_counts(model: nn.Module, layers) -> dict:
    """Total parameters and parameters active per token (shared + K/E of each routed expert bank)."""
    total = sum(p.numel() for p in model.parameters())
    routed = 0
    active_routed = 0.0
    for l in layers:
        n = sum(p.numel() for name, p in l.experts.named_parameters())
        routed += n
        active_routed += n * l.top_k / l.num_experts
    return {"total": total, "routed_experts": routed, "active_per_token": int(total - routed + active_routed)}
