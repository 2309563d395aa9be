"""CLI outputs are checked before any work and never clobbered; numeric flags are range-checked by the CLI.

Every refusal is exit code 2 with exactly one `error:` line, and comes before any model is loaded (the tests
make loading a model fail loudly)."""

import json
import os

import pytest

from allocmoe import io, models
from allocmoe.errors import OutputExistsError, OutputPathError
from allocmoe.plan import Plan
from allocmoe.testing import invoke_cli


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading any model (weights or skeleton) fails the test: the refusals must come first."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the command refused its input")

    monkeypatch.setattr(models, "load_model", boom)
    monkeypatch.setattr(models, "load_skeleton", boom)
    import allocmoe.cli.eval_cmds
    import allocmoe.cli.job_cmds
    import allocmoe.cli.plan_cmds

    import allocmoe.run

    for mod in (allocmoe.cli.plan_cmds, allocmoe.cli.eval_cmds, allocmoe.cli.job_cmds, allocmoe.run):
        monkeypatch.setattr(mod, "load_model", boom)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# each command with an --out file, and the arguments it needs besides
FILE_COMMANDS = {
    "profile": [],
    "allocate": ["--method", "uniform", "--budget", "0.5"],
    "eval": [],
    "bench": [],
    "lm-eval": ["--tasks", "x"],
}


@pytest.mark.parametrize("cmd", sorted(FILE_COMMANDS))
@pytest.mark.parametrize("force", [False, True])
def test_out_that_is_a_directory_is_refused_even_with_force(cmd, force, tmp_path, no_model_loading):
    (tmp_path / "d").mkdir()
    args = [cmd, *FILE_COMMANDS[cmd], "--out", tmp_path / "d"] + (["--force"] if force else [])
    rc, _, err = invoke_cli(*args)
    assert rc == 2 and "is a directory" in one_error_line(err) and "--out" in err
    assert list((tmp_path / "d").iterdir()) == []


@pytest.mark.parametrize("cmd", sorted(FILE_COMMANDS))
def test_out_under_a_regular_file_is_refused(cmd, tmp_path, no_model_loading):
    (tmp_path / "f").write_text("mine")
    rc, _, err = invoke_cli(cmd, *FILE_COMMANDS[cmd], "--out", tmp_path / "f" / "x.json")
    assert rc == 2 and "is a file, not a folder" in one_error_line(err)
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
@pytest.mark.parametrize("out", ["/proc/allocmoe-test.json", "/proc/allocmoe-test/sub/x.json"])
def test_unwritable_out_is_refused_before_the_work(out, no_model_loading):
    rc, _, err = invoke_cli("allocate", "--method", "uniform", "--budget", "0.5", "--out", out)
    assert rc == 2 and f"cannot write plan {out}" in one_error_line(err)


def test_run_out_dir_checks(tmp_path, no_model_loading):
    (tmp_path / "f").write_text("mine")
    rc, _, err = invoke_cli("run", "--out", tmp_path / "f")
    assert rc == 2 and "exists and is not a directory" in one_error_line(err)
    rc, _, err = invoke_cli("run", "--out", tmp_path / "f" / "sub")
    assert rc == 2 and "is a file, not a folder" in one_error_line(err)
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.parametrize("cmd", sorted(FILE_COMMANDS))
def test_existing_file_is_kept_without_force(cmd, tmp_path, no_model_loading):
    (tmp_path / "x.json").write_text("mine")
    rc, _, err = invoke_cli(cmd, *FILE_COMMANDS[cmd], "--out", tmp_path / "x.json")
    assert rc == 2 and "already exists; refusing to overwrite it (pass --force to overwrite)" in one_error_line(err)
    assert (tmp_path / "x.json").read_text() == "mine"


def test_resume_never_replaces_a_finished_profile(tmp_path, no_model_loading):
    (tmp_path / "p.json").write_text("finished")
    rc, _, err = invoke_cli("profile", "--out", tmp_path / "p.json", "--resume")
    assert rc == 2 and "never replaces a finished profile; pass --force" in one_error_line(err)
    assert (tmp_path / "p.json").read_text() == "finished"


@pytest.mark.parametrize("args, flag", [
    (["profile", "--out", "p.json", "--batch-size", "0"], "--batch-size"),
    (["profile", "--out", "p.json", "--tokens", "0"], "--tokens"),
    (["profile", "--out", "p.json", "--seq-len", "1"], "--seq-len"),
    (["eval", "--out", "e.json", "--batch-size", "0"], "--batch-size"),
    (["eval", "--out", "e.json", "--seq-len", "0"], "--seq-len"),
    (["serve", "--port", "99999"], "--port"),
    (["serve", "--port", "-1"], "--port"),
    (["bench", "--out", "b.json", "--repeats", "0"], "--repeats"),
    (["bench", "--out", "b.json", "--warmup", "-1"], "--warmup"),
    (["bench", "--out", "b.json", "--decode-batches", "1,0"], "--decode-batches"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["lm-eval", "--tasks", "x", "--out", "l.json", "--limit", "0"], "--limit"),
    (["run", "--ood-tokens", "-5"], "--ood-tokens"),
    (["allocate", "--out", "a.json", "--method", "uniform", "--budget=1e999999999"], "--budget"),
    (["allocate", "--out", "a.json", "--method", "uniform", "--budget", "9" * 5000], "--budget"),
    (["allocate", "--out", "a.json", "--method", "uniform", "--budget", "nan"], "--budget"),
    (["allocate", "--out", "a.json", "--method", "uniform", "--budget", "0.5", "--min-k", "0"], "--min-k"),
])
def test_numeric_flags_out_of_range_are_one_line_errors(args, flag, tmp_path, monkeypatch, no_model_loading):
    monkeypatch.chdir(tmp_path)
    rc, _, err = invoke_cli(*args)
    line = one_error_line(err)
    assert rc == 2 and flag in line and len(line) < 300
    assert list(tmp_path.iterdir()) == []  # nothing written, no folder made


def test_write_goes_beside_a_file_that_appeared_meanwhile(tmp_path):
    target = io.prepare_output(tmp_path / "r.json")
    (tmp_path / "r.json").write_text("someone else's")
    written = target.write_json({"a": 1})
    assert written == tmp_path / "r.1.json" and json.loads(written.read_text()) == {"a": 1}
    assert (tmp_path / "r.json").read_text() == "someone else's"
    assert target.notice == f"{tmp_path / 'r.json'} appeared while this command ran; left it alone and wrote " \
                            f"{tmp_path / 'r.1.json'} instead"
    # with --force an existing file is replaced, but only if it is still the one that was checked
    forced = io.prepare_output(tmp_path / "r.json", force=True)
    assert forced.write_json({"b": 2}) == tmp_path / "r.json" and forced.notice is None
    assert json.loads((tmp_path / "r.json").read_text()) == {"b": 2}
    changed = io.prepare_output(tmp_path / "r.json", force=True)
    (tmp_path / "r.json").write_text("changed during the run, longer")
    assert changed.write_json({"c": 3}) == tmp_path / "r.2.json"
    assert (tmp_path / "r.json").read_text() == "changed during the run, longer"


def test_prepare_output_errors_are_typed(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match="is a directory"):
        io.prepare_output(tmp_path, force=True)
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        io.prepare_output(tmp_path / "f" / "a" / "b.json")
    with pytest.raises(OutputExistsError, match="already exists"):
        io.prepare_output(tmp_path / "f")
    # a companion file (the compensation maps beside a plan) counts as an output too
    (tmp_path / "p.compensation.safetensors").write_text("maps")
    with pytest.raises(OutputExistsError, match="p.compensation.safetensors already exists"):
        io.prepare_output(tmp_path / "p.json", companions=(Plan.compensation_path,))
    assert io.prepare_output(tmp_path / "new" / "deeper" / "p.json").path.parent.is_dir()  # parents are made


def test_cli_allocate_writes_beside_a_plan_that_appeared_during_the_run(tiny_dir, tmp_path, monkeypatch):
    from allocmoe import planning

    real = planning.allocate

    def racing(*a, **k):
        (tmp_path / "plan.json").write_text("another process's plan")
        return real(*a, **k)

    monkeypatch.setattr(planning, "allocate", racing)
    rc, _, err = invoke_cli("allocate", "--model", tiny_dir("deepseek_v2"), "--method", "uniform", "--budget", "0.5",
                            "--out", tmp_path / "plan.json")
    assert rc == 0, err
    assert (tmp_path / "plan.json").read_text() == "another process's plan"
    assert Plan.load(tmp_path / "plan.1.json").method == "uniform"
    notices = [ln for ln in err.splitlines() if ln.startswith("notice: ")]
    assert len(notices) == 1 and "appeared while this command ran" in notices[0] and "plan.1.json" in notices[0]
