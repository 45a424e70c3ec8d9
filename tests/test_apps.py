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


# ---------------------------------------------------------------- generation by streams

def sample_by_full_forwards(task, vocab, prime, length, temperature, rng):
    """charlm's sampling as it was: the whole model's forward for every character."""
    from rnnfuse.apps.charlm import _draw
    task.model.eval()
    ids = vocab.encode(prime) if prime else np.array([vocab.encode("\n")[0]])
    logits, state = task.model.forward(ids[:, None], None)
    out = []
    for _ in range(length):
        out.append(_draw(logits[-1, 0].astype(np.float64), temperature, rng))
        logits, state = task.model.forward(np.array([[out[-1]]]), state)
    return prime + vocab.decode(out)


def char_task(cell, layers, seed=0):
    from rnnfuse.apps import charlm
    vocab = charlm.Vocab(TEXT)
    ids = vocab.encode(TEXT)
    model = charlm.char_model(vocab.size, cell, 12, layers, embed=5, seed=seed)
    # weights moved off their initialisation, so the samples are not near-uniform draws
    rng = np.random.default_rng(seed + 1)
    for p in model.parameters():
        p += rng.normal(scale=0.5, size=p.shape).astype(p.dtype)
    return charlm.CharLM(model, ids[:200], ids[200:], k=8, batch_size=2, rng=rng), vocab


@pytest.mark.parametrize("cell, layers", [("lstm", 1), ("gru", 2), ("rnn", 1), ("lstm", 3)])
@pytest.mark.parametrize("prime, temperature", [("def ", 0.8), ("", 0.0), ("class A", 1.7),
                                                ("x", 1e-300)])
def test_sampling_by_stream_equals_sampling_by_full_forwards(cell, layers, prime, temperature):
    """The stream's steps are the whole-sequence forward's numbers bit for bit, and each
    step's logits come from the same (1, 1, ...) shapes: the same characters, every one."""
    task, vocab = char_task(cell, layers)
    head, logits = task.model.layers[2], []
    linear = head.forward
    head.forward = lambda x: logits.append(linear(x)) or logits[-1]  # records every call
    got = task.sample(vocab, prime, 120, temperature, np.random.default_rng(3))
    by_stream, logits[:] = logits[:], []
    want = sample_by_full_forwards(task, vocab, prime, 120, temperature,
                                   np.random.default_rng(3))
    assert got == want and len(got) == len(prime) + 120
    # every step's logits, bit for bit (the full forwards make one more, unused)
    assert len(by_stream) == 120 and len(logits) == 121
    assert all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(by_stream, logits))
    assert len(set(got[len(prime):])) > 1 or temperature < 0.01  # drawn, not one repeat


@pytest.mark.parametrize("training", [True, False])
def test_sampling_leaves_the_model_in_its_mode(training):
    task, vocab = char_task("gru", 1)
    task.model.train(training)
    task.sample(vocab, "def ", 5, 0.8, np.random.default_rng(0))
    assert task.model.training is training
    assert all(m.training is training for m in task.model.layers)
    # also when sampling fails: a prime the embedding refuses (an id past the vocabulary)
    task.model.layers[0].num_embeddings = 1
    with pytest.raises(ValueError):
        task.sample(vocab, "def ", 5, 0.8, np.random.default_rng(0))
    assert task.model.training is training


def test_sampling_nothing_gives_the_prime():
    task, vocab = char_task("lstm", 1)
    assert task.sample(vocab, "def ", 0, 0.8, np.random.default_rng(0)) == "def "


@pytest.mark.parametrize("cell, layers", [("lstm", 2), ("gru", 1), ("rnn", 1)])
def test_greedy_decoding_by_stream_equals_decoding_by_full_forwards(cell, layers):
    from rnnfuse.apps.autoencode import AutoencodeTask, _onehot
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 6, (7, 50))
    task = AutoencodeTask(cell, 10, layers, 6, ids, ids, 8, rng, seed=4)
    for p in task.model.parameters():  # confident, varied predictions
        p += rng.normal(scale=0.7, size=p.shape).astype(p.dtype)
    task.model.eval()
    _, state = task.enc.forward(_onehot(ids, 6))
    tok, want = np.full(50, 6), []
    for _ in range(7):  # the decoder's forward over one step at a time, as it was
        y, state = task.dec.forward(_onehot(tok, 7)[None], state)
        tok = np.argmax(task.head.forward(y[0]), axis=-1)
        want.append(tok)
    got = task.reconstruct(ids)
    assert np.array_equal(got, np.array(want)) and len(np.unique(got)) > 1
