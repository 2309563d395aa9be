"""allocmoe's vLLM plugin: serve an allocmoe plan (per-MoE-layer expert counts k_l) on vLLM.

Loaded by vLLM in every process through the `vllm.general_plugins` entry point (`register`). A plan is named
by `ALLOCMOE_PLAN=plan.json` or `--hf-overrides '{"allocmoe_plan": "plan.json"}'`; without one the plugin
changes nothing. With one, each MoE layer vLLM builds (`FusedMoEFactory`, shared by every MoE family in vLLM)
is built with `top_k = k_l`, so its kernels run exactly k_l (token, expert) pairs per token; the executed
pairs are counted per layer and exposed on the API server's /metrics and in the JSON file ALLOCMOE_COUNTS.

This package is separate from `allocmoe` on purpose: importing it pulls in no transformers-dependent code
(the vLLM environment pins an older transformers than allocmoe needs). See plancheck.py for what is refused.
"""

from __future__ import annotations

_installed = False


def register() -> None:
    """The `vllm.general_plugins` entry point; safe to call more than once per process."""
    global _installed
    if _installed:
        return
    _installed = True
    import os

    try:
        from .hook import install

        install()
    except Exception as e:  # a vLLM whose internals moved: never break vLLM for users who name no plan
        if os.environ.get("ALLOCMOE_PLAN"):
            raise
        import logging

        logging.getLogger("vllm.allocmoe").warning(
            "allocmoe plugin not installed (%s: %s): plans cannot be applied in this vLLM", type(e).__name__, e)
