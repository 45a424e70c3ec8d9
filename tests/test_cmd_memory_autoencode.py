"""The memory (adding problem) and autoencode commands, with tiny settings."""
import argparse
import json

import numpy as np
import pytest

from rnnfuse.apps import autoencode as cmd_autoencode
from rnnfuse.apps import memory as cmd_memory
from rnnfuse.apps.common import InputError


def _parse(mod, argv):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    mod.add_parser(sub)
    return p.parse_args(argv)


def _last_json(capsys):
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_adding_problem_data():
    x, y = cmd_memory.adding_problem(500, 20, np.random.default_rng(0))
    assert x.shape == (20, 500, 2) and y.shape == (500, 1) and x.dtype == np.float32
    marks = x[:, :, 1]
    assert np.all(marks.sum(axis=0) == 2)
    assert np.all(marks[:10].sum(axis=0) == 1) and np.all(marks[10:].sum(axis=0) == 1)
    np.testing.assert_allclose(y[:, 0], (x[:, :, 0] * marks).sum(axis=0), rtol=1e-6)
    assert 0 <= x[:, :, 0].min() and x[:, :, 0].max() <= 1


def test_memory_all_cells(capsys):
    args = _parse(cmd_memory, ["memory", "--length", "8", "--hidden", "8", "--steps", "20",
                               "--batch", "16", "--train-size", "200", "--heldout-size", "50",
                               "--eval-every", "10", "--json", "--quiet"])
    assert args.cell is None
    assert cmd_memory.run(args) == 0
    lines, rec = _last_json(capsys)
    assert lines[-2].startswith("held-out MSE at length 8:")
    assert rec["command"] == "memory" and set(rec["cells"]) == {"lstm", "gru", "rnn"}
    for r in rec["cells"].values():
        assert r["steps"] == 20 and np.isfinite(r["mse"])
    assert 0.05 < rec["baseline_mse"] < 0.35


def test_memory_one_cell_learns(capsys):
    # length 4 is easy: a GRU beats the trivial baseline within a few hundred steps
    args = _parse(cmd_memory, ["memory", "--cell", "gru", "--length", "4", "--hidden", "16",
                               "--steps", "300", "--lr", "0.01", "--train-size", "4000",
                               "--heldout-size", "500", "--json", "--quiet"])
    assert cmd_memory.run(args) == 0
    _, rec = _last_json(capsys)
    assert list(rec["cells"]) == ["gru"]
    assert rec["cells"]["gru"]["mse"] < 0.5 * rec["baseline_mse"]


def test_memory_save_paths_per_cell(tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"
    args = _parse(cmd_memory, ["memory", "--length", "6", "--hidden", "4", "--steps", "5",
                               "--train-size", "100", "--batch", "10", "--heldout-size", "20",
                               "--metrics", str(metrics), "--save", str(tmp_path / "ck.rnnf"),
                               "--quiet"])
    assert cmd_memory.run(args) == 0
    for cell in ("lstm", "gru", "rnn"):
        assert (tmp_path / f"m.{cell}.jsonl").exists()
        assert (tmp_path / f"ck.{cell}.rnnf").exists()


def test_memory_resume_one_cell(tmp_path, capsys):
    ck = str(tmp_path / "ck.rnnf")
    base = ["memory", "--cell", "lstm", "--length", "6", "--hidden", "4", "--train-size",
            "100", "--batch", "10", "--heldout-size", "20", "--json", "--quiet"]
    assert cmd_memory.run(_parse(cmd_memory, base + ["--steps", "25"])) == 0
    _, full = _last_json(capsys)
    assert cmd_memory.run(_parse(cmd_memory, base + ["--steps", "15", "--save", ck])) == 0
    capsys.readouterr()
    assert cmd_memory.run(_parse(cmd_memory, base + ["--steps", "25", "--resume", ck])) == 0
    _, resumed = _last_json(capsys)
    assert resumed["cells"]["lstm"]["mse"] == pytest.approx(full["cells"]["lstm"]["mse"],
                                                            rel=1e-5)


@pytest.mark.parametrize("flag", [["--length", "1"], ["--batch", "0"], ["--hidden", "0"],
                                  ["--train-size", "3"]])
def test_memory_bad_input(flag):
    with pytest.raises(InputError):
        cmd_memory.run(_parse(cmd_memory, ["memory", "--quiet"] + flag))


def test_memory_progress_on_stderr(capsys):
    args = _parse(cmd_memory, ["memory", "--cell", "rnn", "--length", "6", "--hidden", "4",
                               "--steps", "10", "--eval-every", "5", "--train-size", "100",
                               "--batch", "10", "--heldout-size", "20"])
    assert cmd_memory.run(args) == 0
    cap = capsys.readouterr()
    assert "eval  rnn  step 5:" in cap.err and "eval" not in cap.out
    assert cap.out.strip().splitlines()[-1].startswith("held-out MSE")


def test_autoencode_runs(capsys):
    args = _parse(cmd_autoencode, ["autoencode", "--length", "4", "--vocab", "5",
                                   "--hidden", "16", "--steps", "30", "--train-size", "500",
                                   "--heldout-size", "100", "--json", "--quiet"])
    assert args.cell == "lstm"
    assert cmd_autoencode.run(args) == 0
    lines, rec = _last_json(capsys)
    assert lines[-2].startswith("held-out greedy reconstruction: token accuracy")
    assert rec["command"] == "autoencode" and rec["steps"] == 30
    assert 0 <= rec["sequence_accuracy"] <= rec["token_accuracy"] <= 1


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_autoencode_learns_short_sequences(cell, capsys):
    args = _parse(cmd_autoencode, ["autoencode", "--cell", cell, "--length", "3", "--vocab",
                                   "4", "--hidden", "32", "--steps", "400", "--lr", "0.01",
                                   "--train-size", "5000", "--heldout-size", "200", "--json",
                                   "--quiet"])
    assert cmd_autoencode.run(args) == 0
    _, rec = _last_json(capsys)
    assert rec["token_accuracy"] > 0.8  # chance is 0.25


def test_autoencode_greedy_matches_teacher_forcing_when_right():
    """Greedy decoding feeds back its own tokens; where every prediction is right it must
    equal the teacher-forced argmax."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 3, (5, 40))
    task = cmd_autoencode.AutoencodeTask("gru", 8, 1, 3, ids, ids, 8, rng)
    task.model.eval()
    _, state = task.enc.forward(cmd_autoencode._onehot(ids, 3))
    y, _ = task.dec.forward(task._decoder_input(ids), state)
    forced = np.argmax(task.head.forward(y), axis=-1)
    greedy = task.reconstruct(ids)
    assert greedy.shape == ids.shape
    assert np.array_equal(greedy[0], forced[0])  # the first step sees the same input
    right = np.cumprod(greedy == ids, axis=0).astype(bool)  # rows right so far
    prefix = np.vstack([np.ones((1, 40), bool), right[:-1]])
    assert np.array_equal(greedy[prefix], forced[prefix])


@pytest.mark.parametrize("flag", [["--vocab", "1"], ["--length", "0"], ["--train-size", "1"]])
def test_autoencode_bad_input(flag):
    with pytest.raises(InputError):
        cmd_autoencode.run(_parse(cmd_autoencode, ["autoencode", "--quiet"] + flag))
