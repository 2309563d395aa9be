"""Serving engines other than transformers: `allocmoe serve --engine vllm` (vllm_serve).

The plan is checked here first, in allocmoe's own process and without importing vLLM: the plan file, the
token policy and options vLLM can run (`allocmoe_vllm.plancheck`), the model's config.json against the plan's
fingerprint, and the attention vLLM on CPU cannot run. Each refusal is an AllocMoeError (one `error:` line,
exit 2) before any vLLM process starts. Then `vllm serve` runs with the plan named by ALLOCMOE_PLAN; allocmoe's
vLLM plugin (entry point `vllm.general_plugins`, package `allocmoe_vllm`) applies it in every vLLM process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from .errors import DependencyError, ModelLoadError, PlanError, UnsupportedModelError

ENGINES = ("transformers", "vllm")
_PROBE = ("import importlib.util as u, sys; "
          "sys.exit(0 if u.find_spec('vllm') and u.find_spec('allocmoe_vllm') else 3)")


def vllm_python() -> str:
    """The interpreter that runs vLLM: ALLOCMOE_VLLM_PYTHON (a Python environment with vLLM and allocmoe
    installed), else this one; refused with one line when it has no vLLM or no allocmoe plugin."""
    py = os.environ.get("ALLOCMOE_VLLM_PYTHON") or sys.executable
    try:
        ok = subprocess.run([py, "-c", _PROBE], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        raise DependencyError(
            f"vLLM (with allocmoe's plugin) is not installed for {py}: install allocmoe and vllm in one environment "
            "(README: vLLM) or set ALLOCMOE_VLLM_PYTHON to that environment's python", param="engine")
    return py


def check_vllm_plan(model_dir: str, plan_path: str, *, gpu: bool | None = None) -> dict:
    """Every start-up check that does not need vLLM: returns the plan as the plugin reads it."""
    try:
        from allocmoe_vllm.plancheck import VllmPlanError, check_fingerprint, config_fingerprint, load_plan
    except ImportError:  # pragma: no cover - the package ships beside allocmoe
        raise DependencyError("allocmoe's vLLM plugin (package allocmoe_vllm) is not installed; reinstall allocmoe")
    try:
        plan = load_plan(plan_path)
    except VllmPlanError as e:
        raise PlanError(str(e), param="plan") from None
    cfg_file = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {cfg_file} ({type(e).__name__})", param="model") from None
    try:
        check_fingerprint(plan, config_fingerprint(cfg), where=f"the model {model_dir}")
    except VllmPlanError as e:
        raise PlanError(str(e), param="plan") from None
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    kv, rope = cfg.get("kv_lora_rank"), cfg.get("qk_rope_head_dim")
    if not gpu and kv and rope is not None and kv + rope != 576:
        raise UnsupportedModelError(
            f"vLLM on CPU runs multi-head latent attention only with head size 576 (kv_lora_rank 512 + "
            f"qk_rope_head_dim 64, the real DeepSeek-V2/V3 sizes); {model_dir} has {kv} + {rope}: serve it with "
            f"--engine transformers", param="engine")
    return plan


def vllm_serve(model: str | None, plan: str, *, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto",
               served_model_name: str | None = None, extra_args: Sequence[str] = (),
               log: Callable[[str], None] = print) -> int:
    """Serve `plan` on vLLM's OpenAI-compatible server; blocks until the server exits and returns its exit
    code. Refusals (bad plan, plan for another model, a model vLLM cannot run here) raise before serving."""
    from .models import builtin_name, resolve

    if not plan:
        raise PlanError("--engine vllm needs a plan (--plan plan.json)", param="plan")
    ref = resolve(model)
    local = Path(ref).is_dir()
    plan_d = check_vllm_plan(ref, plan) if local else None
    if not local:  # a hub id: the plugin checks the plan against the config vLLM downloads, before serving
        from allocmoe_vllm.plancheck import VllmPlanError, load_plan

        try:
            plan_d = load_plan(plan)
        except VllmPlanError as e:
            raise PlanError(str(e), param="plan") from None
    py = vllm_python()
    name = served_model_name or (f"allocmoe/{builtin_name(model)}" if builtin_name(model) else str(model or ref))
    cmd = [py, "-m", "allocmoe_vllm.cli", "serve", ref, "--host", host, "--port", str(port),
           "--dtype", dtype, "--served-model-name", name, *extra_args]
    env = dict(os.environ, ALLOCMOE_PLAN=plan_d["path"])
    env.setdefault("ALLOCMOE_COUNTS", os.path.join(tempfile.mkdtemp(prefix="allocmoe-vllm-"), "counts.json"))
    log(f"serving plan {plan_d['path']} (k per MoE layer {plan_d['ks']}) on vLLM at http://{host}:{port}/v1 "
        f"as {name!r}; measured counts: /metrics (allocmoe_*) and {env['ALLOCMOE_COUNTS']}")
    proc = subprocess.Popen(cmd, env=env)
    return _wait_forwarding_signals(proc)


def _wait_forwarding_signals(proc: subprocess.Popen, grace_s: float = 30.0) -> int:
    """Wait for the vLLM server; SIGINT/SIGTERM sent to allocmoe go to it (it shuts its engine down), and it is
    killed if it has not exited `grace_s` seconds later. Never leaves a server behind this process."""
    stopped: list[float] = []

    def forward(signum, _frame):
        stopped.append(time.monotonic())
        if proc.poll() is None:
            proc.send_signal(signum)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if stopped and time.monotonic() - stopped[0] > grace_s:
                    proc.kill()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if proc.poll() is None:  # an exception here (not a signal): do not leave the server running
            proc.kill()
            proc.wait()
