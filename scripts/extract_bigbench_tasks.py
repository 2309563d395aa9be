"""Extract the small BIG-bench multiple-choice tasks that allocmoe ships, from the bigbench 1.0.0 sdist on PyPI.

    python scripts/extract_bigbench_tasks.py [--out src/allocmoe/assets/tasks]

`pip download --no-deps bigbench==1.0.0` fetches the sdist (~360 MB) into a temp dir; it is never installed. Only
the task JSON files named below are read from the archive. The extract is deterministic: the first N examples of
each task, in file order, with every top-level field of the task (canary, name, ...) kept: still BIG-bench format.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from allocmoe.io import atomic_write_json  # noqa: E402

VERSION = "1.0.0"
ROOT = f"bigbench-{VERSION}/bigbench/benchmark_tasks"
# output file -> (path inside the sdist, name to record, number of examples kept)
TASKS = {
    # 50,000 generated examples ("Which sentence has the correct adjective order: a ... b ...?"); the first 200
    # are balanced 100 "a" / 100 "b".
    "hyperbaton.json": ("hyperbaton/task.json", "hyperbaton", 200),
    # 51 pairs of one-sentence "X because Y" vs "Y because X", scored with an empty input: plain sentence
    # likelihood, which even a tiny English LM can do above chance.
    "cause_and_effect.json": ("cause_and_effect/one_sentence_no_prompt/task.json",
                              "cause_and_effect:one_sentence_no_prompt", None),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "src/allocmoe/assets/tasks"))
    out = Path(ap.parse_args().out)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"bigbench=={VERSION}", "-d", tmp, "-q"], check=True)
        (sdist,) = Path(tmp).glob("bigbench-*.tar.gz")
        with tarfile.open(sdist) as tar:
            for fname, (member, name, n) in TASKS.items():
                src = json.load(tar.extractfile(f"{ROOT}/{member}"))
                # every top-level field as in the source (canary, description, BIG-bench prompt settings, ...)
                task = {k: v for k, v in src.items() if k != "examples"}
                task["name"] = name
                task["source"] = f"BIG-bench {VERSION} (PyPI sdist), bigbench/benchmark_tasks/{member}"
                task["examples"] = src["examples"][:n]
                atomic_write_json(out / fname, task)
                (out / fname).chmod(0o644)  # the atomic write's temp file is created 0600
                print(f"{out / fname}: {len(task['examples'])} of {len(src['examples'])} examples")


if __name__ == "__main__":
    main()
