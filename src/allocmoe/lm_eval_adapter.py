"""Run EleutherAI lm-evaluation-harness tasks on an in-memory (possibly `allocmoe.apply`-patched) model.

lm-eval is optional: `pip install 'allocmoe[lm-eval]'`. Its HF backend needs accelerate as well (lm-eval's `hf`
extra). Tested with lm-eval 0.4.13.

Note: simple_evaluate seeds Python's, numpy's and torch's global RNGs, and records the git hash of the current
directory (`git describe`) and an environment report (torch's collect_env) in its output.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import DataError, DependencyError

_MISSING = "lm-eval is not installed; pip install 'allocmoe[lm-eval]'"


def run_lm_eval(model, tokenizer, tasks: list[str], include_path: str | None = None, limit: int | float | None = None,
                batch_size: int = 8, num_fewshot: int | None = None) -> dict[str, Any]:
    """Evaluate `model` on lm-eval `tasks`; returns {"results", "n-shot", "versions", "higher_is_better",
    "n-samples", "config"}, all JSON-serialisable.

    The model is wrapped as-is (`HFLM(pretrained=model, ...)` takes it on its current device and dtype, so a patched
    model stays patched). include_path: a folder of extra task YAMLs; when every requested task is found there, lm-eval's
    ~15k built-in tasks are not indexed (saves ~10 s). A task's `dataset_kwargs.data_files` paths are resolved by
    `datasets` against the current directory. limit: examples per task (int) or fraction (float < 1).
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DependencyError(_MISSING) from None
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:  # lm-eval without its `hf` extra: accelerate (or peft) missing
        raise DependencyError(f"lm-eval's HF backend cannot be imported ({e}); pip install 'lm-eval[hf]'") from None

    tm = None
    if include_path is not None:
        tm = TaskManager(include_path=include_path, include_defaults=False)
        if not set(tasks) <= set(tm.all_tasks):
            tm = None
    if tm is None:
        tm = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise DataError(f"unknown lm-eval task(s): {', '.join(unknown)}"
                            + ("" if include_path else " (pass include_path for local task YAMLs)"))

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=False)
    keep = ["results", "n-shot", "versions", "higher_is_better", "n-samples", "config"]
    # round-trip through JSON: drops numpy scalars and anything else json cannot write (as str)
    return json.loads(json.dumps({k: out[k] for k in keep if k in out}, default=str))
