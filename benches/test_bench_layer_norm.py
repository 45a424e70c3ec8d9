"""The layer-normalized LSTM's training step (forward + backward) against the plain LSTM's,
and against the same model written in PyTorch as a loop of nn.LSTMCell-style steps with
nn.LayerNorm (haste's form: separate LNs of the input and recurrent pre-activations, and
of the cell for the output), float32, 1 thread. Each rnnfuse step is checked against the
reference once before it is timed.

    pytest benches/test_bench_layer_norm.py          (pytest-benchmark, one group per shape)
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/test_bench_layer_norm.py [BUDGET]
        (interleaved medians of plain, layer norm and the torch loop, and their ratios)
"""
import sys

import numpy as np
import pytest

from rnnfuse import functional as F
from rnnfuse import reference as R
from rnnfuse.bench import own_workspace

SHAPES = [(100, 32, 128, 256), (35, 20, 650, 650)]  # T, B, I, H


def _case(T, B, I, H):
    rng = np.random.default_rng(0)

    def r(*shape, scale=1.0, at=0.0):
        return (at + scale * rng.standard_normal(shape)).astype(np.float32)

    s = 1 / np.sqrt(H)
    return dict(x=r(T, B, I), w_ih=r(4 * H, I, scale=s), w_hh=r(4 * H, H, scale=s),
                b_ih=r(4 * H, scale=s), b_hh=r(4 * H, scale=s), dy=r(T, B, H),
                ln=(r(4 * H, scale=0.1, at=1), r(4 * H, scale=0.1, at=1),
                    r(H, scale=0.1, at=1), r(H, scale=0.1)))


def _step(module, c, layer_norm):
    def fn():
        y, h_n, c_n, ctx = module.lstm_forward(c["x"], None, None, c["w_ih"], c["w_hh"],
                                               c["b_ih"], c["b_hh"],
                                               layer_norm=c["ln"] if layer_norm else None)
        return (y, h_n, c_n) + tuple(module.lstm_backward(c["dy"], None, None, ctx))
    return fn


def _torch_step(c):
    """The same math in PyTorch: per step two matmuls, nn.LayerNorm of each (gain, no
    shift), the gates, nn.LayerNorm of the cell (gain and shift); autograd backward."""
    import torch
    T, B, I = c["x"].shape
    H = c["w_hh"].shape[1]
    p = {k: torch.nn.Parameter(torch.tensor(c[k])) for k in ("w_ih", "w_hh", "b_ih", "b_hh")}
    ln_ih = torch.nn.LayerNorm(4 * H, bias=False)
    ln_hh = torch.nn.LayerNorm(4 * H, bias=False)
    ln_c = torch.nn.LayerNorm(H)
    with torch.no_grad():
        for m, g in ((ln_ih, c["ln"][0]), (ln_hh, c["ln"][1]), (ln_c, c["ln"][2])):
            m.weight.copy_(torch.tensor(g))
        ln_c.bias.copy_(torch.tensor(c["ln"][3]))
    x, dy = torch.tensor(c["x"]), torch.tensor(c["dy"])

    def fn():
        h = torch.zeros(B, H)
        cell = torch.zeros(B, H)
        ys = []
        for t in range(T):
            gates = ln_ih(x[t] @ p["w_ih"].T) + ln_hh(h @ p["w_hh"].T) + p["b_ih"] + p["b_hh"]
            i, f, g, o = gates.chunk(4, 1)
            cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(ln_c(cell))
            ys.append(h)
        for q in list(p.values()) + list(ln_ih.parameters()) + list(ln_hh.parameters()) + \
                list(ln_c.parameters()):
            q.grad = None
        (torch.stack(ys) * dy).sum().backward()
        return torch.stack(ys).detach().numpy()
    return fn


def _checked(case):
    """The layer-norm step, checked against the reference on its first 10 steps (over all
    of them both float32 results drift ~5e-4 from float64's: random weights make the
    gradients grow to ~1e5 through time)."""
    short = dict(case, x=case["x"][:10], dy=case["dy"][:10])
    got, want = _step(F, short, True)(), _step(R, short, True)()
    for g, w in zip(got, want):
        if w is not None:
            scale = max(float(np.max(np.abs(w))), 1.0)
            assert np.max(np.abs(g - w)) / scale < 1e-4
    return _step(F, case, True)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("variant", ["plain", "layer_norm"])
def test_lstm_training_step(benchmark, shape, variant):
    pytest.importorskip("pytest_benchmark")
    case = _case(*shape)
    fn = _checked(case) if variant == "layer_norm" else _step(F, case, False)
    benchmark.group = "lstm-train-layer-norm-" + "-".join(map(str, shape))
    benchmark.extra_info.update(variant=variant, T=shape[0], B=shape[1], I=shape[2],
                                H=shape[3])
    benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)


def main(budget=20.0):
    from threadpoolctl import threadpool_limits

    from rnnfuse import _kernels
    from rnnfuse.bench import measure
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        torch = None
    _kernels.set_threads(1)
    with threadpool_limits(1):
        for shape in SHAPES:
            case = _case(*shape)
            fns = {"plain": own_workspace(_step(F, case, False)),
                   "layer_norm": own_workspace(_checked(case))}
            if torch is not None:  # checked as _checked's step
                short = dict(case, x=case["x"][:10], dy=case["dy"][:10])
                got, want = _torch_step(short)(), _step(F, short, True)()[0]
                assert np.max(np.abs(got - want)) < 1e-4, "the torch loop computes otherwise"
                fns["torch_loop"] = _torch_step(case)
            m = {k: v[0] for k, v in measure(fns, budget=budget).items()}
            line = "  ".join(f"{k} {v * 1e3:.1f} ms" for k, v in m.items())
            ratios = f"layer_norm/plain {m['layer_norm'] / m['plain']:.3f}"
            if "torch_loop" in m:
                ratios += f"  torch_loop/layer_norm {m['torch_loop'] / m['layer_norm']:.2f}"
            print("(T,B,I,H)=({},{},{},{})".format(*shape), line, " ", ratios, flush=True)


if __name__ == "__main__":
    main(*(float(a) for a in sys.argv[1:2]))
