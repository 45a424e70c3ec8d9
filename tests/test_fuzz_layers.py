"""Fuzzing the layers: random constructions (every cell, depth, direction, layout, bias,
dtype, sizes from 0, ragged or not) run forward and backward with the right shapes, zero
padding and finite gradients; inputs of a wrong kind raise TypeError or ValueError.
(Values are checked against PyTorch and the kernels in test_layers*.py.)"""
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rnnfuse

CELLS = {"lstm": rnnfuse.LSTM, "gru": rnnfuse.GRU, "rnn": rnnfuse.RNN}
# tools/fuzz_long.sh sets RNNFUSE_FUZZ_EXAMPLES for its long runs
LONG = os.environ.get("RNNFUSE_FUZZ_EXAMPLES")


@settings(max_examples=int(LONG or 60), deadline=None, derandomize=LONG is None)
@given(cell=st.sampled_from(sorted(CELLS)), layers=st.integers(1, 2), bidir=st.booleans(),
       batch_first=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]),
       T=st.integers(0, 4), B=st.integers(0, 3), I=st.integers(1, 4), H=st.integers(1, 5),
       ragged=st.booleans(), seed=st.integers(0, 1000))
def test_random_layers_run_and_backpropagate(cell, layers, bidir, batch_first, bias, dtype,
                                             T, B, I, H, ragged, seed):
    layer = CELLS[cell](I, H, num_layers=layers, bidirectional=bidir, batch_first=batch_first,
                        bias=bias, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = rng.standard_normal(shape).astype(dtype)
    lengths = rng.integers(0, T + 1, size=B) if ragged else None
    y, state = layer(x, lengths=lengths)
    D = 2 if bidir else 1
    assert y.shape == ((B, T, D * H) if batch_first else (T, B, D * H)) and y.dtype == dtype
    dx, _ = layer.backward(rng.standard_normal(y.shape).astype(dtype))
    assert dx.shape == x.shape and np.all(np.isfinite(dx))
    for name, g in layer.grads.items():
        assert g.shape == dict(layer.named_parameters())[name].shape
    if lengths is not None and B:
        t_axis = 1 if batch_first else 0
        for b, n in enumerate(lengths):  # padded steps of y are zero
            pad = np.take(np.take(y, [b], axis=1 - t_axis), range(n, T), axis=t_axis)
            assert not np.any(pad)


WRONG = [None, "abc", 3, 2.5, [[1.0]], np.ones((2, 2), np.int64), np.ones((2, 2, 2), np.float16),
         np.ones((2, 2, 2), np.complex64), np.ones((2, 2, 3), np.float32), np.ones((1,)),
         np.array([[[object()]]])]


@settings(max_examples=int(LONG or 80), deadline=None, derandomize=LONG is None)
@given(cell=st.sampled_from(sorted(CELLS)), wrong=st.sampled_from(range(len(WRONG))),
       slot=st.sampled_from(["x", "state", "lengths", "dy"]))
def test_wrong_inputs_raise_type_or_value_error(cell, wrong, slot):
    layer = CELLS[cell](2, 3, dtype=np.float64, seed=0)
    x = np.ones((2, 2, 2))
    value = WRONG[wrong]
    if slot == "dy":
        layer(x)
        if value is None:  # dy=None is allowed: zeros
            return
        with pytest.raises((TypeError, ValueError)):
            layer.backward(value)
        return
    args = {"x": x, "state": None, "lengths": None}
    args[slot] = value
    if slot != "x" and value is None:
        return
    with pytest.raises((TypeError, ValueError)):
        layer(args["x"], state=args["state"], lengths=args["lengths"])
