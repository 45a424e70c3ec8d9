"""rnnfuse.checkpoint: round trips, atomic writes, every refused file (truncated, any byte
flipped, other version, mismatched model), all-or-nothing restore, and the property that an
interrupted and resumed run reproduces the uninterrupted run's losses bitwise."""
import os
import struct

import numpy as np
import pytest

from rnnfuse import checkpoint as ck
from rnnfuse.checkpoint import CheckpointError, load_checkpoint, restore_checkpoint, save_checkpoint
from rnnfuse.data import BatchIterator
from rnnfuse.losses import mse_loss
from rnnfuse.optim import Adam, CosineAnnealingLR, LinearWarmup, StepLR, clip_grad_norm


class Toy:
    """A per-step linear regression ``pred (T, B, 1) = x (T, B, I) @ w.T + b`` with the
    layers' parameter protocol (live named_parameters, grads, state dicts)."""

    def __init__(self, I=3, seed=0):
        rng = np.random.default_rng(seed)
        self._p = {"w": rng.normal(size=(1, I)), "b": np.zeros(1)}
        self.grads = {k: np.zeros_like(v) for k, v in self._p.items()}

    def named_parameters(self):
        return dict(self._p)

    def state_dict(self):
        return {k: v.copy() for k, v in self._p.items()}

    def load_state_dict(self, sd):
        for k, v in sd.items():
            self._p[k][...] = v

    def forward_backward(self, x, target, lengths):
        pred = x @ self._p["w"].T + self._p["b"]
        loss, dpred = mse_loss(pred, target, lengths)
        self.grads["w"][...] = np.einsum("tbo,tbi->oi", dpred, x)
        self.grads["b"][...] = dpred.sum(axis=(0, 1))
        return loss


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=2)}


# ---------------------------------------------------------------- round trips

def test_round_trip_of_every_supported_value(tmp_path):
    path = tmp_path / "a.ckpt"
    gen = np.random.Generator(np.random.MT19937(3))  # its state holds an ndarray
    extra = {
        "nested": {"list": [1, 2.5, "s", None, True, (3, [4])], "empty": {}, "t": ()},
        "big": 2**130, "neg": -7, "nan": float("nan"), "inf": -float("inf"),
        "np_scalars": [np.float32(1.5), np.int16(-3), np.bool_(True), np.complex64(1 + 2j)],
        "arrays": [np.arange(12, dtype=">i4").reshape(3, 4), np.asfortranarray(np.ones((2, 3))),
                   np.arange(10.0)[::3], np.zeros((0, 4), np.float32), np.array(5.0),
                   np.array([True, False]), np.array([1 + 1j], np.complex128)],
    }
    save_checkpoint(path, _state(), {"type": "X"}, None, gen, 42, extra=extra)
    c = load_checkpoint(path)
    assert c["step"] == 42 and c["version"] == ck.FORMAT_VERSION
    assert c["optimizer"] == {"type": "X"} and c["scheduler"] is None
    for k, v in _state().items():
        assert c["model"][k].dtype == v.dtype and np.array_equal(c["model"][k], v)
        assert c["model"][k].flags.writeable
    e = c["extra"]
    assert e["nested"] == extra["nested"] and e["big"] == 2**130 and e["neg"] == -7
    assert np.isnan(e["nan"]) and e["inf"] == -np.inf
    for got, want in zip(e["np_scalars"], extra["np_scalars"]):
        assert type(got) is type(want) and got == want
    for got, want in zip(e["arrays"], extra["arrays"]):
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    restored = np.random.Generator(np.random.MT19937(0))
    restored.bit_generator.state = c["rng"]
    assert restored.random() == gen.random()


def test_overwrite_and_pathlike(tmp_path):
    path = tmp_path / "a.ckpt"
    save_checkpoint(path, _state(0), step=1)
    save_checkpoint(str(path), _state(1), step=2)
    assert load_checkpoint(path)["step"] == 2
    assert os.listdir(tmp_path) == ["a.ckpt"]


# ---------------------------------------------------------------- refused files

def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "a.ckpt"
    save_checkpoint(path, _state(), step=3)
    blob = path.read_bytes()
    for n in (0, 5, 27, 28, 100, len(blob) // 2, len(blob) - 1):
        path.write_bytes(blob[:n])
        with pytest.raises(CheckpointError, match=r"a.ckpt: truncated"):
            load_checkpoint(path)
    path.write_bytes(blob + b"\0")
    with pytest.raises(CheckpointError, match="1 unexpected trailing bytes"):
        load_checkpoint(path)


def test_every_flipped_byte_is_refused(tmp_path):
    path = tmp_path / "a.ckpt"
    save_checkpoint(path, {"w": np.arange(6.0).reshape(2, 3)}, {"lr": 0.1}, None, None, 1)
    blob = path.read_bytes()
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x20
        path.write_bytes(bytes(bad))
        with pytest.raises(CheckpointError, match=r"a.ckpt: (corrupted|truncated|not an rnnfuse|"
                                                  r"checkpoint format version)"):
            load_checkpoint(path)
    bad = bytearray(blob)
    bad[40] ^= 1  # inside the header: only the checksum can tell
    path.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match=r"corrupted checkpoint \(SHA-256 checksum mismatch\)"):
        load_checkpoint(path)


def test_other_format_version_and_foreign_file_are_refused(tmp_path):
    path = tmp_path / "a.ckpt"
    save_checkpoint(path, _state(), step=0)
    blob = bytearray(path.read_bytes())
    struct.pack_into("<I", blob, 8, 2)
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="checkpoint format version 2 is not supported "
                                              r"\(this rnnfuse reads version 1\)"):
        load_checkpoint(path)
    np.savez(tmp_path / "b.npz", w=np.zeros(3))
    with pytest.raises(CheckpointError, match="b.npz: not an rnnfuse checkpoint"):
        load_checkpoint(tmp_path / "b.npz")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("expected, msg", [
    ({"w": np.zeros((3, 2), np.float32)}, "unexpected 'b'"),
    ({**_state(), "extra_w": np.zeros(1)}, "missing 'extra_w'"),
    ({"w": np.zeros((2, 3), np.float32), "b": np.zeros(2)}, r"'w' shape \(3, 2\), expected \(2, 3\)"),
    ({"w": np.zeros((3, 2)), "b": np.zeros(2)}, "'w' dtype float32, expected float64"),
])
def test_mismatched_model_state_is_refused(tmp_path, expected, msg):
    path = tmp_path / "a.ckpt"
    save_checkpoint(path, _state(), step=0)
    with pytest.raises(CheckpointError, match=f"a.ckpt: model state does not match .*{msg}"):
        load_checkpoint(path, expected=expected)


# ---------------------------------------------------------------- atomic writes

def _write_then_fail(monkeypatch, after_bytes, exc):
    real_fdopen = os.fdopen

    class Failing:
        def __init__(self, f):
            self.f, self.n = f, 0

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def write(self, b):
            if self.n + len(b) > after_bytes:
                self.f.write(bytes(b)[:after_bytes - self.n])
                raise exc
            self.n += len(b)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(ck.os, "fdopen", lambda *a, **k: Failing(real_fdopen(*a, **k)))


@pytest.mark.parametrize("how", ["disk_full_mid_write", "ctrl_c_mid_write", "fsync", "rename"])
def test_interrupted_write_keeps_old_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch, how):
    path = tmp_path / "a.ckpt"
    save_checkpoint(path, _state(0), step=1)
    old = path.read_bytes()
    if how == "disk_full_mid_write":
        _write_then_fail(monkeypatch, 50, OSError(28, "No space left on device"))
        err = OSError
    elif how == "ctrl_c_mid_write":
        _write_then_fail(monkeypatch, 30, KeyboardInterrupt())
        err = KeyboardInterrupt
    else:
        def boom(*a, **k):
            raise OSError(5, f"simulated {how} failure")
        monkeypatch.setattr(ck.os, "fsync" if how == "fsync" else "replace", boom)
        err = OSError
    with pytest.raises(err):
        save_checkpoint(path, _state(1), step=2)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["a.ckpt"]
    assert path.read_bytes() == old and load_checkpoint(path)["step"] == 1


@pytest.mark.parametrize("kwargs, err, msg", [
    (dict(model_state=[np.zeros(2)]), TypeError, "model_state must be a mapping of name -> np.ndarray, got list"),
    (dict(model_state={"w": [1.0]}), TypeError, r"model_state\['w'\] must be an np.ndarray, got list"),
    (dict(model_state={1: np.zeros(1)}), TypeError, "model_state keys must be str, got int"),
    (dict(step=-1), ValueError, "step must be >= 0, got -1"),
    (dict(step=1.5), TypeError, "step must be an int, got float"),
    (dict(extra={"s": {1, 2}}), TypeError, r"extra\['s'\] has type set: a checkpoint holds only"),
    (dict(extra={3: 1}), TypeError, "extra has a key 3 of type int: checkpoint dict keys must be str"),
    (dict(optimizer_state={"a": np.array(["x"])}), TypeError, r"optimizer_state\['a'\] must have a numeric or bool dtype"),
    (dict(extra=[np.array([object()])]), TypeError, r"extra\[0\] must have a numeric or bool dtype to be saved, got object"),
])
def test_bad_input_writes_nothing(tmp_path, kwargs, err, msg):
    args = dict(model_state=_state(), step=0) | kwargs
    with pytest.raises(err, match=msg):
        save_checkpoint(tmp_path / "a.ckpt", **args)
    assert os.listdir(tmp_path) == []


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory does not exist"):
        save_checkpoint(tmp_path / "no" / "a.ckpt", _state())
    with pytest.raises(IsADirectoryError, match="path is a directory"):
        save_checkpoint(tmp_path, _state())
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        save_checkpoint(3, _state())
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- restore into live objects

def _setup(seed):
    model = Toy(seed=seed)
    opt = Adam(model.named_parameters(), lr=0.05)
    sched = LinearWarmup(opt, 3, after=CosineAnnealingLR(opt, T_max=20, eta_min=0.001))
    return model, opt, sched


def test_restore_refuses_mismatch_and_leaves_everything_untouched(tmp_path):
    path = tmp_path / "a.ckpt"
    model, opt, sched = _setup(0)
    opt.step({"w": np.ones((1, 3)), "b": np.ones(1)})
    sched.step()
    save_checkpoint(path, model.state_dict(), opt.state_dict(), sched.state_dict(), None, 1)

    other = Toy(I=4)  # wrong shape
    before = other.state_dict()
    with pytest.raises(CheckpointError, match=r"'w' shape \(1, 3\), expected \(1, 4\)"):
        restore_checkpoint(path, other)
    assert all(np.array_equal(before[k], v) for k, v in other.state_dict().items())

    # the scheduler refuses (another type) after the optimizer was restored: both put back
    model2, opt2, _ = _setup(1)
    sched2 = StepLR(opt2, 5)
    m_before, o_before, s_before = model2.state_dict(), opt2.state_dict(), sched2.state_dict()
    with pytest.raises(ValueError, match="schedule state_dict is for 'LinearWarmup'"):
        restore_checkpoint(path, model2, opt2, sched2)
    assert all(np.array_equal(m_before[k], v) for k, v in model2.state_dict().items())
    assert opt2.state_dict()["state"] == {} and opt2.lr == o_before["hyper"]["lr"]
    assert sched2.state_dict() == s_before

    with pytest.raises(CheckpointError, match="checkpoint has no rng state to restore"):
        restore_checkpoint(path, _setup(2)[0], rng=np.random.default_rng())
    with pytest.raises(TypeError, match="model must have state_dict"):
        restore_checkpoint(path, object())


# ---------------------------------------------------------------- resume reproduces the run

def _data():
    rng = np.random.default_rng(123)
    seqs = [rng.normal(size=(n, 3)) for n in rng.integers(1, 7, size=22)]
    true_w = np.array([[0.5, -1.0, 2.0]])
    targets = [s @ true_w.T + 0.3 for s in seqs]
    return seqs, targets


def _train(model, opt, sched, batches, noise_rng, steps, losses):
    for _ in range(steps):
        x, lengths, target = next(batches)
        x = x + 0.01 * noise_rng.standard_normal(x.shape)  # consumes the run's RNG
        losses.append(model.forward_backward(x, target, lengths))
        clip_grad_norm(model.grads, 5.0)
        opt.step(model.grads)
        sched.step()


def _forever(it):
    while True:
        yield from it


def test_interrupted_and_resumed_run_reproduces_losses_bitwise(tmp_path):
    seqs, targets = _data()
    make_it = lambda seed: BatchIterator(seqs, targets, batch_size=4, shuffle=True, seed=seed)  # noqa: E731

    model, opt, sched = _setup(0)
    straight = []
    _train(model, opt, sched, _forever(make_it(7)), np.random.default_rng(99), 20, straight)

    model, opt, sched = _setup(0)
    it, rng = make_it(7), np.random.default_rng(99)
    first = []
    _train(model, opt, sched, _forever(it), rng, 10, first)
    path = tmp_path / "run.ckpt"
    save_checkpoint(path, model.state_dict(), opt.state_dict(), sched.state_dict(),
                    rng, 10, extra={"data": it.state_dict()})
    del model, opt, sched, it, rng

    # fresh objects, deliberately seeded differently: everything must come from the file
    model, opt, sched = _setup(5)
    it, rng = make_it(1), np.random.default_rng(1)
    ckpt = restore_checkpoint(path, model, opt, sched, rng, data_iterator=it)
    assert ckpt["step"] == 10 and it.state_dict()["position"] == 10 - len(it)
    second = []
    _train(model, opt, sched, _forever(it), rng, 10, second)

    assert len(straight) == 20
    np.testing.assert_array_equal(np.array(first + second), np.array(straight))
    assert [float(v).hex() for v in first + second] == [float(v).hex() for v in straight]
    assert straight[-1] < straight[0]  # it does train
