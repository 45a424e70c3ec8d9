"""Cell variants against the plain cell: an LSTM training step (forward + backward) plain,
with peepholes, with zoneout (training masks), with recurrent dropout (a (B, H) mask) and
with weight drop (as the layers run it: a fresh mask over W_hh drawn, W_hh * mask, and
dW_hh * mask), float32, side by side in one group. Each variant's result is checked
against the reference once before it is timed. Run: ``pytest benches/test_bench_variants.py``
(threads: --bench-threads, default 1).
"""
import numpy as np
import pytest

from rnnfuse import functional as F
from rnnfuse import reference as R

pytest.importorskip("pytest_benchmark")

SHAPES = [(100, 32, 128, 256), (35, 20, 650, 650)]  # T, B, I, H (as bench --variants)


def _case(T, B, I, H):
    rng = np.random.default_rng(0)
    r = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    s = 1 / np.sqrt(H)
    return dict(x=r(T, B, I), w_ih=r(4 * H, I, scale=s), w_hh=r(4 * H, H, scale=s),
                b_ih=r(4 * H, scale=s), b_hh=r(4 * H, scale=s), peep=r(3 * H, scale=s),
                dy=r(T, B, H), zoneout=tuple((rng.random((T, B, H)) < 0.15).astype(np.float32)
                                             for _ in range(2)),
                recurrent_dropout=((rng.random((B, H)) >= 0.25) / 0.75).astype(np.float32))


def _weight_drop_mask(shape, p=0.5):
    """Weight drop's mask as a layer draws it (the same mask at every call)."""
    keep = np.random.default_rng(1).random(shape) >= p
    return keep.astype(np.float32) * np.float32(1 / (1 - p))


def _step(module, c, variant):
    def fn():
        w_hh, mask = c["w_hh"], None
        if variant == "weight_drop":
            mask = _weight_drop_mask(w_hh.shape)
            w_hh = w_hh * mask
        y, h_n, c_n, ctx = module.lstm_forward(
            c["x"], None, None, c["w_ih"], w_hh, c["b_ih"], c["b_hh"],
            peepholes=c["peep"] if variant == "peepholes" else None,
            zoneout=c["zoneout"] if variant == "zoneout" else None,
            recurrent_dropout=(c["recurrent_dropout"] if variant == "recurrent_dropout"
                               else None))
        grads = list(module.lstm_backward(c["dy"], None, None, ctx))
        if mask is not None:
            grads[4] = grads[4] * mask  # dW_hh
        return (y, h_n, c_n) + tuple(grads)
    return fn


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("variant", ["plain", "peepholes", "zoneout", "recurrent_dropout",
                                     "weight_drop"])
def test_lstm_training_step(benchmark, shape, variant):
    case = _case(*shape)
    fn = _step(F, case, variant)
    got, want = fn(), _step(R, case, variant)()
    for g, w in zip(got, want):
        if w is not None:
            scale = max(float(np.max(np.abs(w))), 1.0)
            assert np.max(np.abs(g - w)) / scale < 1e-4
    benchmark.group = "lstm-train-variants-" + "-".join(map(str, shape))
    benchmark.extra_info.update(variant=variant, T=shape[0], B=shape[1], I=shape[2],
                                H=shape[3])
    benchmark.pedantic(fn, rounds=11, iterations=1, warmup_rounds=1)
