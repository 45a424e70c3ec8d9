"""A forward of a single step with few rows reads W_ih and W_hh where they lie
(rf_transposed_gemm: W (G*H, K) row-major, transposed in registers) instead of packing them
per call. Every output is still the packed product's chain (from zero, over k in order), so
the bits are the packed path's exactly. The oracles take the packed path on the same
weights: the weights packed ahead (functional.Prepacked), and the first step of a two-step
forward (whose products run on packed weights, the same chains whatever the rows).

Every cell and option, float32/64, inference and training forwards, 1 to 17 rows (both
sides of the bound, RF_STEP_IN_PLACE_ROWS), sizes with tails (I and G*H not multiples of a
vector or a panel), on every code path.
"""
import numpy as np
import pytest

from rnnfuse import functional as F
from checks import kernel  # noqa: F401 (a fixture), tests/checks.py
from test_prepacked import CELL_IDS, CELLS, assert_bitwise, plain, problem

ROWS = range(1, 18)
# (I, H): tails of every kind; and I past RF_PANEL_K_MAX, where many rows take the register
# path too
SIZES = [(5, 7), (13, 9), (33, 17), (8, 16), (515, 5)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell, opts", CELLS, ids=CELL_IDS)
def test_one_step_gives_the_packed_weights_bits(kernel, cell, opts, dtype):
    for B in ROWS:
        for I, H in SIZES:
            x, states, w = problem(cell, dtype, 1, B, I, H, seed=B * 100 + I)
            packed = F.Prepacked(cell, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], **opts)
            want = packed(x, *states)
            assert_bitwise(plain(cell, opts, x, states, w), want)
            fwd = getattr(F, f"{cell}_forward")
            trained = fwd(x, *states, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], **opts)
            assert_bitwise(trained[:-1], want)
            assert_bitwise(plain(cell, opts, x, [None] * len(states), w),
                           packed(x))


def first_step(cell, x, states, w, **kw):
    """y[0] of a forward over x's steps, and of its first step alone: (one step, two)."""
    fwd = getattr(F, f"{cell}_forward")
    args = (*states, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
    one = fwd(x[:1], *args, need_ctx=False, **kw)[0]
    return one, fwd(x, *args, need_ctx=False, **kw)[0][:1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variant", ["peepholes", "lstm_ln", "gru_ln", "gru_orig", "rnn_relu"])
def test_one_step_of_every_variant_is_the_longer_forwards_first_step(kernel, variant, dtype):
    cell = variant.split("_")[0] if variant != "peepholes" else "lstm"
    for B in ROWS:
        I, H = SIZES[B % len(SIZES)]
        x, states, w = problem(cell, dtype, 2, B, I, H, seed=B)
        rng = np.random.default_rng(B)
        G = 4 if cell == "lstm" else 3 if cell == "gru" else 1
        kw = {}
        if variant == "peepholes":
            kw["peepholes"] = rng.standard_normal(3 * H).astype(dtype)
        elif variant.endswith("_ln"):
            gains = [1 + 0.3 * rng.standard_normal(n).astype(dtype)
                     for n in (G * H, G * H, H, H)[:4 if cell == "lstm" else 2]]
            kw["layer_norm"] = tuple(gains)
        if variant == "gru_orig":
            kw["linear_before_reset"] = False
        if variant == "rnn_relu":
            kw["nonlinearity"] = "relu"
        one, two = first_step(cell, x, states, w, **kw)
        assert one.tobytes() == two.tobytes(), f"B={B} I={I} H={H}"
