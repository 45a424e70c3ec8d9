"""The training loop (rnnfuse.train.fit) on a tiny character model."""
import json

import numpy as np
import pytest

from rnnfuse import Adam, CheckpointError, CosineAnnealingLR
from rnnfuse import train
from rnnfuse.apps import charlm

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def make(seed=0, hidden=8, lr=1e-2, dropout=0.0):
    vocab = charlm.Vocab(TEXT)
    ids = vocab.encode(TEXT)
    rng = np.random.default_rng(seed)
    model = charlm.char_model(vocab.size, "lstm", hidden, 2 if dropout else 1, embed=6,
                              seed=seed)
    model[1].dropout = dropout  # between its two layers, masks drawn from its generator
    opt = Adam(model.named_parameters(), lr=lr)
    sched = CosineAnnealingLR(opt, T_max=200)
    task = charlm.CharLM(model, ids[:1500], ids[1500:], k=10, batch_size=4, rng=rng)
    return task, opt, sched, rng


def run(tmp_path=None, resume=None, save=None, dropout=0.0, **kw):
    task, opt, sched, rng = make(dropout=dropout)
    return train.fit(task, opt, scheduler=sched, clip=1.0, rng=rng, progress=False,
                     resume=resume, save=save, **kw)


def test_loss_decreases_and_jsonl_written(tmp_path):
    path = tmp_path / "m.jsonl"
    res = run(epochs=3, metrics=str(path))
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert all(r["kind"] == "epoch" and "loss" in r and "tok_per_s" in r for r in lines)
    assert res.stopped == "epochs" and res.epoch == 3
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert res.step == len(res.losses)


def test_early_stopping_triggers():
    # lr 0: the held-out loss never improves after the first evaluation
    task, opt, sched, rng = make(lr=0.0)
    res = train.fit(task, opt, epochs=20, patience=2, rng=rng, progress=False)
    assert res.stopped == "early_stopping"
    assert res.epoch == 3 and len(res.history) == 3


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_resume_reproduces_uninterrupted_run(tmp_path, dropout):
    full = run(epochs=3, dropout=dropout)
    ck = str(tmp_path / "ck.rnnf")
    # interrupted twice: at an epoch boundary, then in the middle of an epoch
    first = run(epochs=1, save=ck, dropout=dropout)
    assert first.epoch == 1
    mid = run(epochs=3, save=ck, resume=ck, max_steps=first.step + 7, dropout=dropout)
    assert mid.stopped == "max_steps"
    rest = run(epochs=3, save=ck, resume=ck, dropout=dropout)
    assert rest.losses == full.losses          # exactly, every step
    assert rest.last["loss"] == full.last["loss"]
    assert rest.step == full.step and rest.epoch == 3
    assert [p for p in tmp_path.iterdir() if p.name != "ck.rnnf"] == []  # no temp files left


def test_resume_refuses_the_mask_generators_of_another_model(tmp_path):
    ck = str(tmp_path / "ck.rnnf")
    run(epochs=1, save=ck, dropout=0.3)
    task, opt, _, rng = make(dropout=0.3)
    task.model[1]._rng = np.random.Generator(np.random.MT19937(0))
    with pytest.raises(CheckpointError, match="does not fit MT19937"):
        train.fit(task, opt, epochs=2, rng=rng, progress=False, resume=ck)


def test_resume_refuses_another_model(tmp_path):
    ck = str(tmp_path / "ck.rnnf")
    run(epochs=1, save=ck)
    task, opt, _, rng = make(hidden=12)
    with pytest.raises(CheckpointError, match="does not match"):
        train.fit(task, opt, epochs=2, rng=rng, progress=False, resume=ck)


def test_nan_loss_stops_with_a_clear_error():
    task, opt, _, rng = make()
    task.model.named_parameters()["2.bias"][...] = np.nan
    with pytest.raises(train.TrainingError, match="loss became nan"):
        train.fit(task, opt, epochs=1, rng=rng, progress=False)


def test_plain_progress_lines(capsys):
    import io
    buf = io.StringIO()
    task, opt, _, rng = make()
    bar = train.Progress(total=None, desc="train", stream=buf, every=0.0, use_tqdm=False)
    bar.update(1, 2.0, 100)
    bar.close()
    assert "loss 2.0000" in buf.getvalue() and "tok/s" in buf.getvalue()


def test_resumed_progress_bar_starts_at_the_step_reached(tmp_path, monkeypatch):
    import io
    import sys
    import types

    made = []

    class FakeBar:  # records how fit() sets up the bar; shows nothing
        def __init__(self, **kw):
            made.append(kw)

        def set_postfix_str(self, *args, **kw):
            pass

        def update(self, n):
            pass

        def close(self):
            pass

    auto = types.ModuleType("tqdm.auto")
    auto.tqdm = FakeBar
    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", auto)
    ck = str(tmp_path / "ck.rnnf")
    task, opt, sched, rng = make()
    first = train.fit(task, opt, epochs=1, rng=rng, save=ck, stream=io.StringIO())
    task, opt, sched, rng = make()
    train.fit(task, opt, epochs=2, rng=rng, resume=ck, stream=io.StringIO())
    assert [kw["initial"] for kw in made] == [0, first.step]
    assert made[1]["total"] == 2 * len(task.data)


def test_a_failing_evaluation_leaves_the_model_in_training_mode():
    task, opt, sched, rng = make()

    def broken():
        raise KeyboardInterrupt  # e.g. the user stops a long evaluation

    task.evaluate = broken
    with pytest.raises(KeyboardInterrupt):
        train.fit(task, opt, epochs=1, rng=rng, progress=False)
    assert all(m.training for m in task.model)
