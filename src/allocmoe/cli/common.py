"""What every command module shares: the Typer app, the consoles, the common options and small helpers."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ..errors import AllocMoeError
from ..methods import METHODS
from ..policies import TOKEN_POLICIES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run a Mixture-of-Experts model under an expert-activation budget (Alloc-MoE).")
err = Console(stderr=True)
out = Console()

MODEL_HELP = "Local Hugging Face model directory or hub id (default: the built-in model)."
METHOD_HELP = "; ".join(f"{n}: {m.summary}" + (" (needs --profile)" if m.needs_profile else "")
                        for n, m in METHODS.items())
POLICY_HELP = "; ".join(f"{n}: {p.summary}" + (" (calibrated on text)" if p.calibrated else "")
                        for n, p in TOKEN_POLICIES.items())
ModelOpt = typer.Option(None, "--model", "-m", help=MODEL_HELP)
ForceOpt = typer.Option(False, "--force", help="Overwrite an existing output file.")
# large models (README "Large models"): accelerate's offload and transformers' tensor / expert parallel
DeviceMapOpt = typer.Option(None, "--device-map", help="accelerate device map, e.g. auto: spread layers over the "
                                                       "GPUs, CPU and disk (implied by --max-memory).")
MaxMemoryOpt = typer.Option(None, "--max-memory", help="Memory cap per device, e.g. cpu=8GiB or 0=70GiB,cpu=100GiB "
                                                       "(a bare size caps the CPU); layers beyond it are offloaded.")
OffloadDirOpt = typer.Option(None, "--offload-dir", help="Folder for offloaded weights (default: a temporary one).")
ParallelOpt = typer.Option(None, "--parallel", help="Under torchrun --nproc-per-node N: tp (tensor parallel) or ep "
                                                    "(expert parallel; N must divide the experts) via transformers' "
                                                    "DistributedConfig.")


def load_kwargs(device_map=None, max_memory=None, offload_dir=None, parallel=None) -> dict:
    return {"device_map": device_map, "max_memory": max_memory, "offload_dir": offload_dir, "parallel": parallel}


def checked_out(path: Path, force: bool, what: str = "output"):
    """The output `path` checked before any work (io.prepare_output): the target to write the result through."""
    from ..io import prepare_output

    return prepare_output(path, force, what=what)


def write_json_result(target, obj) -> Path:
    """Write `obj` through a checked output; a one-line notice when it had to go beside the path."""
    written = target.write_json(obj)
    if target.notice:
        err.print(f"notice: {target.notice}", highlight=False, markup=False, soft_wrap=True)
    return written


def int_option(value: str, flag: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise AllocMoeError(f"{flag} must be 'auto' or an integer, got {value!r}") from None


def text_windows(model_tok, data, tokens, seq_len, split="calibration"):
    from ..data import read_texts, token_windows

    texts, names = read_texts(data, split)
    name = names[0] if len(names) == 1 else f"{len(names)} text files"
    return token_windows(model_tok, texts, seq_len, tokens, name=name), names
