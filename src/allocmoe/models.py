"""Loading models: the built-in default checkpoint, a local Hugging Face directory, or a hub id.

The real `from_pretrained` paths are used for everything; the built-in model is just a local directory
that ships inside the package (found with importlib.resources, so it works from an installed wheel).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .errors import DependencyError, ModelLoadError, SettingsError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


#: The built-in models: `builtin:<name>` -> folder under assets/. The first is the default (no --model).
BUILTIN_MODELS = {
    "deepseek-v2": "default_model",  # DeepSeek-V2 architecture: MLA, 2 shared experts, top-6 of 64
    "qwen3-moe": "qwen3_moe_model",  # Qwen3-MoE architecture: GQA, no shared experts, top-8 of 64
}
DEFAULT_BUILTIN = "deepseek-v2"
BUILTIN_PREFIX = "builtin:"


def builtin_model_dir(name: str = DEFAULT_BUILTIN) -> Path:
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(f"unknown built-in model {BUILTIN_PREFIX}{name} (choose from "
                             f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)})", param="model")
    return Path(str(resources.files("allocmoe") / "assets" / BUILTIN_MODELS[name]))


def default_model_dir() -> Path:
    return builtin_model_dir(DEFAULT_BUILTIN)


def builtin_name(spec: str | os.PathLike | None) -> str | None:
    """The built-in model a spec names (None, "", "default", "builtin" -> the default), else None."""
    if spec is None or str(spec) in ("", "default", "builtin"):
        return DEFAULT_BUILTIN
    s = str(spec)
    return s[len(BUILTIN_PREFIX):] if s.startswith(BUILTIN_PREFIX) else None


def resolve(spec: str | os.PathLike | None) -> str:
    """A local directory path (absolute) or a hub id. None means the built-in model; `builtin:NAME` names
    one of the built-in models (`BUILTIN_MODELS`)."""
    name = builtin_name(spec)
    if name is not None:
        d = builtin_model_dir(name)
        if not (d / "config.json").exists():
            raise ModelLoadError(f"the built-in model {BUILTIN_PREFIX}{name} is missing from {d} "
                                 "(reinstall allocmoe or give a model)", param="model")
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


def load_model(spec: str | os.PathLike | None = None, dtype: str = "float32", device: str = "cpu", *,
               device_map: str | dict | None = None, max_memory: str | dict | None = None,
               offload_dir: str | os.PathLike | None = None, parallel: str | None = None):
    """(model, tokenizer, path): eval mode, weights loaded with `AutoModelForCausalLM.from_pretrained`.

    Bigger than memory (accelerate's conventions): `device_map="auto"` spreads the layers over the GPUs, the CPU
    and disk; `max_memory` caps each device ("cpu=2GiB,0=20GiB", a dict, or one size for the CPU) and implies
    `device_map="auto"`; layers that do not fit are offloaded to `offload_dir` (default: a temporary folder)
    and streamed in, one at a time, when they run.

    Several devices in one job (under `torchrun --nproc-per-node N`): `parallel="tp"` loads the model with
    transformers' tensor parallelism (`DistributedConfig(tp_size=N, tp_plan="auto")`), `parallel="ep"` with
    expert parallelism (`DistributedConfig(ep_size=N, fsdp_size=N)`: each rank holds E/N experts).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = local_path(spec)
    if dtype not in DTYPES:
        raise SettingsError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})", param="dtype")
    kwargs = {}
    if parallel is not None:
        kwargs = _parallel_kwargs(path, parallel, device_map or max_memory or offload_dir)
    elif device_map is not None or max_memory is not None or offload_dir is not None:
        kwargs = _offload_kwargs(path, dtype, device_map, max_memory, offload_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **kwargs)
        model = (model if kwargs else model.to(device)).eval()
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


# --------------------------------------------------------------------------------------------------
# bigger than memory (accelerate) and sharded loading (transformers' DistributedConfig)
# --------------------------------------------------------------------------------------------------


def parse_max_memory(spec: str | dict | None) -> dict | None:
    """'cpu=2GiB,0=20GiB' -> {'cpu': '2GiB', 0: '20GiB'}; a bare size caps the CPU; a dict passes through."""
    if spec is None or isinstance(spec, dict):
        return spec
    from accelerate.utils import convert_file_size_to_int

    out: dict = {}
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, size = part.rpartition("=")
        key = key.strip() if sep else "cpu"
        try:
            convert_file_size_to_int(size.strip())
        except Exception:
            raise SettingsError(f"max_memory: {size.strip()!r} is not a size like 2GiB or 500MB",
                                param="max_memory") from None
        if key.isdigit():
            key = int(key)
        elif key not in ("cpu", "mps", "disk") and not key.startswith(("cuda", "xpu", "npu")):
            raise SettingsError(f"max_memory: unknown device {key!r} (use cpu, a GPU index such as 0, or disk)",
                                param="max_memory")
        out[key] = size.strip()
    if not out:
        raise SettingsError(f"max_memory {spec!r} names no device (use e.g. cpu=2GiB,0=20GiB)", param="max_memory")
    return out


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def largest_layer_bytes(path: str, dtype: str) -> tuple[int, str]:
    """Bytes of the largest decoder layer (what must fit in memory at once when the rest is offloaded)."""
    from .adapters import decoder_layers

    model, _ = load_skeleton(path)
    cfg_dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    dt = DTYPES[dtype] if dtype != "auto" else (getattr(torch, str(cfg_dtype).replace("torch.", ""), torch.float32)
                                               if cfg_dtype else torch.float32)
    size = torch.empty((), dtype=dt).element_size()
    best, name = 0, "?"
    for i, layer in enumerate(decoder_layers(model)):
        n = sum(p.numel() for p in layer.parameters()) * size
        if n > best:
            best, name = n, f"decoder layer {i}"
    return best, name


def _offload_kwargs(path: str, dtype: str, device_map, max_memory, offload_dir) -> dict:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise DependencyError("device_map / max_memory / offload_dir need accelerate (pip install accelerate)",
                              param="device_map") from None
    from accelerate.utils import convert_file_size_to_int

    mm = parse_max_memory(max_memory)
    if mm:
        need, name = largest_layer_bytes(path, dtype)
        caps = {k: convert_file_size_to_int(v) for k, v in mm.items() if k != "disk"}
        if caps and max(caps.values()) < need:
            raise SettingsError(f"max_memory {max_memory if isinstance(max_memory, str) else mm} is too small to "
                                f"load even one layer: {name} needs {_fmt_bytes(need)} on one device",
                                param="max_memory")
    if offload_dir is None:
        import atexit
        import shutil
        import tempfile

        offload_dir = tempfile.mkdtemp(prefix="allocmoe-offload-")
        atexit.register(shutil.rmtree, offload_dir, ignore_errors=True)
    Path(offload_dir).mkdir(parents=True, exist_ok=True)
    kw = {"device_map": device_map or "auto", "offload_folder": str(offload_dir)}
    if mm:
        kw["max_memory"] = mm
    return kw


def num_routed_experts(config) -> int | None:
    for name in ("n_routed_experts", "num_local_experts", "num_experts"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _parallel_kwargs(path: str, parallel: str, offload) -> dict:
    from . import distributed

    if parallel not in ("tp", "ep"):
        raise SettingsError(f"unknown parallel mode {parallel!r} (choose tp or ep)", param="parallel")
    if offload:
        raise SettingsError("parallel cannot be combined with device_map / max_memory / offload_dir",
                            param="parallel")
    if not distributed.init_from_env():
        raise SettingsError(f"parallel={parallel!r} needs several processes: launch with "
                            "torchrun --nproc-per-node N", param="parallel")
    from transformers.distributed import DistributedConfig

    world = distributed.world_size()
    config, _ = load_config(path)
    if parallel == "ep":
        E = num_routed_experts(config)
        if E is None or E % world:
            raise SettingsError(f"expert parallel over {world} ranks needs a rank count that divides the model's "
                                f"{E} experts", param="parallel")
        return {"distributed_config": DistributedConfig(ep_size=world, fsdp_size=world)}
    return {"distributed_config": DistributedConfig(tp_size=world, tp_plan="auto")}


@contextmanager
def weights_loaded(module: nn.Module):
    """Read `module`'s weights outside its forward (e.g. in a forward hook) when accelerate offloads them: its
    hook loads them before and puts them back after, as around a forward call. A no-op for other modules."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        yield module
        return
    hook.pre_forward(module)
    try:
        yield module
    finally:
        hook.post_forward(module, None)
