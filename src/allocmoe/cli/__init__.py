"""The `allocmoe` command line. Every command: --help, progress on stderr, exit 0 on success and a
one-line `error: ...` with exit code 2 on bad input.

The commands live in modules by concern (plan_cmds, eval_cmds, job_cmds, serve_cmd); importing them
registers them on the one Typer `app` (common.py), in the order `allocmoe --help` lists them.
"""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from ..errors import AllocMoeError
from . import plan_cmds, eval_cmds, job_cmds, serve_cmd  # noqa: F401  (register the commands)
from .common import app, err

__all__ = ["app", "main", "run_cli", "error_line", "FLAG_HINTS"]


# Library errors name API parameters (`AllocMoeError.param`); the CLI adds the flag that sets each one.
FLAG_HINTS = {
    "force": "pass --force to overwrite", "resume": "--resume", "seq_len": "--seq-len", "model": "--model",
    "data": "--data", "dtype": "--dtype", "method": "--method", "budget": "--budget",
    "token_policy": "--token-policy", "max_tokens": "--max-tokens", "tokenizer": "--model", "record": None,
    "max_memory": "--max-memory", "device_map": "--device-map", "parallel": "--parallel",
    "repeats": "--repeats", "warmup": "--warmup", "threads": "--threads", "decode_batches": "--decode-batches",
    "prefill_len": "--prefill-len", "experts_implementation": "--experts-implementation",
    "sparse_path": "--sparse-path", "continuous_batching": "--continuous-batching", "port": "--port",
    "out": "--out", "recipe": "--recipe", "profile": "--profile", "texts": "--data",
    "profile_at": "--profile-at",
}


def error_line(e: AllocMoeError) -> str:
    hint = FLAG_HINTS.get(getattr(e, "param", None) or "")
    return f"{e} ({hint})" if hint else str(e)


def run_cli(argv: list[str] | None = None) -> int:
    """Run the command line on `argv` (default: sys.argv[1:]) and return the exit code; errors are one line."""
    try:
        # with standalone_mode=False click returns (not raises) the code of an Exit, e.g. 130 after Ctrl-C
        rc = app(args=argv, prog_name="allocmoe", standalone_mode=False)
    except AllocMoeError as e:
        err.print(f"[red]error:[/red] {escape(error_line(e))}", highlight=False, soft_wrap=True)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        return 130
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:  # usage errors (bad option values, unknown options)
        # typer >= 0.26 vendors click (typer._click), so its exceptions are not click.ClickException;
        # both kinds have show() and exit_code
        names = {c.__name__ for c in type(e).__mro__}
        if "NoArgsIsHelpError" in names or "ClickException" not in names:
            if "ClickException" in names:
                e.show()  # a bare group: its help
                return e.exit_code
            raise
        # one line, like every other error: the message, and where the command's help is
        ctx = getattr(e, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None and "UsageError" in names else ""
        err.print(f"error: {e.format_message()}{where}", highlight=False, markup=False, soft_wrap=True)
        return e.exit_code
    return rc if isinstance(rc, int) else 0


def main() -> None:
    sys.exit(run_cli())
