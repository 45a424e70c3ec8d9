"""rnnfuse.apps: the pieces the commands share, and how the commands use them."""
import ast
import contextlib
import gc
import io
import pathlib
import sys
import warnings

import numpy as np
import pytest

from rnnfuse import apps
from rnnfuse.__main__ import main
from rnnfuse.apps import common

TEXT = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 60


def tiny_argv(cmd, tmp_path):
    """A one-step run of each command, quiet."""
    if cmd == "charlm":
        text = tmp_path / "text.txt"
        text.write_text(TEXT, encoding="utf-8")
        extra = ["--text", text, "--embed", "4", "--batch", "2", "--bptt", "4", "--sample", "3"]
    elif cmd == "classify":
        rng = np.random.default_rng(0)
        np.savez(tmp_path / "d.npz", x=rng.standard_normal((20, 3, 2)), y=np.arange(20) % 2)
        extra = ["--npz", tmp_path / "d.npz", "--batch", "4"]
    else:
        extra = {"forecast": ["--length", "40", "--window", "4", "--batch", "8"],
                 "memory": ["--cell", "gru", "--length", "4", "--batch", "4", "--train-size",
                            "8", "--heldout-size", "4"],
                 "autoencode": ["--length", "3", "--vocab", "3", "--batch", "4",
                                "--train-size", "8", "--heldout-size", "4"]}[cmd]
    return [cmd, *map(str, extra), "--hidden", "4", "--steps", "1", "--quiet"]


# ---------------------------------------------------------------- the progress stream

def test_progress_stream_closes_the_null_device_and_leaves_stderr_open():
    with common.progress_stream(True) as out:
        assert out is not sys.stderr and not out.closed
        print("unseen", file=out)
    assert out.closed
    with common.progress_stream(False) as out:
        assert out is sys.stderr
    assert not sys.stderr.closed


def test_progress_stream_closes_the_null_device_on_an_error():
    with pytest.raises(common.InputError):
        with common.progress_stream(True) as out:
            raise common.InputError("bad")
    assert out.closed


@pytest.mark.parametrize("cmd", apps.COMMANDS)
def test_quiet_runs_leave_no_file_open(cmd, tmp_path):
    """--quiet writes progress to the null device: each command closes it (an unclosed file
    warns when it is collected)."""
    argv = tiny_argv(cmd, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main(argv) == 0
        gc.collect()
    assert "held-out" in out.getvalue() or "test accuracy" in out.getvalue()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []


# ---------------------------------------------------------------- evaluation reports

def test_once_per_step_skips_repeats_and_keeps_no_state_between_uses():
    seen_a, seen_b = [], []
    a = common.once_per_step(lambda rec: seen_a.append(rec["step"]))
    b = common.once_per_step(lambda rec: seen_b.append(rec["step"]))
    for step in (5, 5, 10, 10, 12):
        a({"step": step})
    b({"step": 5})
    assert seen_a == [5, 10, 12] and seen_b == [5]


# ---------------------------------------------------------------- flags

def test_shared_flag_checks_name_the_flag():
    import argparse
    p = argparse.ArgumentParser()
    common.add_shared_flags(p, hidden=8, layers=1, epochs=1)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args(["--max-minutes", "0"])
    common.check_shared_flags(args)
    assert args.max_minutes is None  # 0: no limit
    with pytest.raises(common.InputError, match=r"^--eval-every must be >= 1, got 0$"):
        common.check_shared_flags(p.parse_args(["--eval-every", "0"]))
    with pytest.raises(common.InputError, match=r"^--lr must be a finite number >= 0, got nan$"):
        common.check_shared_flags(p.parse_args(["--lr", "nan"]))
    with pytest.raises(common.InputError, match=r"^--x must lie in \(0, 0.5\), got nan$"):
        common.check_interval("--x", float("nan"), 0, 0.5)


def test_every_cell_flag_value_has_a_layer_class():
    import argparse
    p = argparse.ArgumentParser()
    common.add_shared_flags(p, hidden=8, layers=1, epochs=1)
    cell = next(a for a in p._actions if a.dest == "cell")
    assert tuple(cell.choices) == tuple(common.CELLS) == ("lstm", "gru", "rnn")


# ---------------------------------------------------------------- the package

def test_each_command_has_a_parser_and_a_run():
    for name in apps.COMMANDS:
        mod = apps.command(name)
        assert callable(mod.add_parser) and callable(mod.run)
    with pytest.raises(ValueError, match="no command 'bench'"):
        apps.command("bench")


def test_commands_import_nothing_from_each_other():
    """What two commands share lives in common, not in one of them."""
    root = pathlib.Path(apps.__file__).parent
    for name in apps.COMMANDS:
        tree = ast.parse((root / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module == "common", f"{name} imports from .{node.module}"
