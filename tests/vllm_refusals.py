"""Start vLLM (in the vLLM environment) once per plan given and print the one-line start-up refusal of each:

    .venv-vllm/bin/python tests/vllm_refusals.py MODEL_DIR PLAN [PLAN ...]

prints one JSON line per plan: {"plan": ..., "refused": bool, "error": "<type>: <first line>"}. The plugin
refuses in the front-end process (EngineArgs.create_engine_config) before any engine process starts, so one
process can try several plans.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    model, plans = sys.argv[1], sys.argv[2:]
    from vllm import LLM

    for plan in plans:
        os.environ["ALLOCMOE_PLAN"] = plan
        try:
            llm = LLM(model=model, dtype="float32", max_model_len=128, enforce_eager=True)
        except Exception as e:
            print(json.dumps({"plan": plan, "refused": True, "type": type(e).__name__,
                              "error": str(e).strip().splitlines()[0] if str(e).strip() else ""}), flush=True)
        else:  # pragma: no cover - a failure of the test
            print(json.dumps({"plan": plan, "refused": False}), flush=True)
            del llm
    return 0


if __name__ == "__main__":
    sys.exit(main())
