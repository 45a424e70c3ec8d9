"""Benchmarks: the grid, the implementations side by side, and ``python -m rnnfuse bench``.

One source for both harnesses: benches/ (pytest-benchmark) and the command line import the
grid, the problems, the runners and the checks from here.

- The grid: every cell (LSTM, GRU, RNN tanh), inference (forward only) and training step
  (forward + backward), float32 and float64, on the shapes of ``GRID`` (T, B, I, H), one of
  them also as a ragged batch (lengths uniform in [T/4, T]). ``QUICK_GRID`` is the smoke grid.
- The implementations: ``rnnfuse`` (rnnfuse.functional), ``prepacked``
  (rnnfuse.functional.Prepacked: the weights packed once, before timing, as ONNX Runtime
  packs them when its session is made; inference only), ``reference`` (rnnfuse.reference,
  plain NumPy), and, when installed, ``torch`` (torch.nn.LSTM/GRU/RNN, packed sequences for
  ragged batches) and ``onnxruntime`` (an ONNX LSTM/GRU/RNN node built from the same weights;
  inference only). A peer that is missing, or cannot run a case, raises ``Unavailable``.
- Every runner's result is checked against the reference once, before anything is timed.
- Threads: everything runs on ``threads`` threads (default 1): BLAS through threadpoolctl,
  PyTorch through torch.set_num_threads, ONNX Runtime through intra_op_num_threads.

The command line prints, per case, the median ms per call of interleaved runs in one process
and each implementation's time divided by rnnfuse's (above 1: rnnfuse is faster), next to
the GEMM floor (the call's matrix products alone, one BLAS call each) and the FLOP bound
(the matrix-product FLOPs at the measured single-call GEMM peak of this machine). With
``--markdown PATH`` it also times rnnfuse at two thread counts (thread_scaling) and the
peak memory of one call (peak_memory), and writes the performance document
(docs/performance.md) from the template in rnnfuse._perfdoc.

Serving (``--serving``, benches/test_bench_pool.py): many sessions of one layer, each
stepped one timestep per frame, by a stream pool (one call for all), by one stream per
session, and by the peers per session (their state passed in and out) and batched.

Variants (``--variants``, benches/test_bench_variants.py): the LSTM's training step with
each variant (``VARIANTS``) against the plain cell's, and against the same model written
in PyTorch (a Python loop of nn.LSTMCell, the variant in torch ops; torch.nn.LSTM for the
projection), interleaved, float32.
"""
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ._checks import OneLineParser, first_line

__all__ = ["Shape", "Case", "GRID", "QUICK_GRID", "CELLS", "MODES", "DTYPES", "IMPLS",
           "Unavailable", "NotApplicable", "cases", "problem", "runner", "reference_result",
           "check", "limit_threads", "measure", "gemm_peak", "matmul_flops", "thread_scaling",
           "peak_memory", "ServingShape", "SERVING_SHAPES", "SERVING_QUICK", "SERVING_IMPLS",
           "serving_layer", "serving_stepper", "serving_check", "serving_case", "Variant",
           "VARIANTS", "VARIANT_SHAPES", "VARIANT_QUICK", "variant_layer", "variant_problem",
           "torch_variant_model", "variant_check", "variant_case", "main"]

CELLS = ("lstm", "gru", "rnn")
MODES = ("inference", "training")
DTYPES = ("float32", "float64")
IMPLS = ("rnnfuse", "prepacked", "reference", "torch", "onnxruntime")
from ._kernels import GATES as _GATES  # noqa: E402 (the C cell table)

# Checks before timing: the largest |difference| over the largest |reference value|, per
# output. Loose enough for a peer's own summation order and activations over 200 steps,
# tight enough that a wrong gate, bias or padding rule fails by orders of magnitude.
TOLERANCE = {"float32": 1e-3, "float64": 1e-8}


@dataclass(frozen=True)
class Shape:
    T: int
    B: int
    I: int  # noqa: E741
    H: int
    ragged: bool = False

    @property
    def label(self):
        return f"T{self.T}xB{self.B}xI{self.I}xH{self.H}" + ("-ragged" if self.ragged else "")


GRID = (
    Shape(50, 1, 32, 32),
    Shape(100, 16, 64, 128),
    Shape(100, 32, 128, 256),
    Shape(100, 64, 256, 512),
    Shape(200, 8, 128, 128),
    Shape(35, 20, 650, 650),
    Shape(100, 32, 128, 256, ragged=True),
)
QUICK_GRID = (
    Shape(50, 1, 32, 32),
    Shape(50, 4, 32, 32, ragged=True),
)


@dataclass(frozen=True)
class Case:
    cell: str
    mode: str
    dtype: str
    shape: Shape

    @property
    def group(self):
        """The pytest-benchmark group: the implementations of one case sit side by side."""
        return f"{self.cell}-{self.mode}-{self.dtype}-{self.shape.label}"

    @property
    def training(self):
        return self.mode == "training"


def cases(grid=GRID, cells=CELLS, modes=MODES, dtypes=DTYPES):
    """Every (cell, mode, dtype, shape) of the grid, shape-major (small problems first)."""
    return [Case(c, m, d, s) for s in grid for d in dtypes for m in modes for c in cells]


class Unavailable(Exception):
    """This implementation cannot run this case here (not installed, or not supported)."""


class NotApplicable(Unavailable):
    """This case is outside what the implementation is for (ONNX Runtime training)."""


# ----------------------------------------------------------------------------- problems

@dataclass(frozen=True)
class Problem:
    x: np.ndarray
    h0: np.ndarray
    c0: np.ndarray  # None except for LSTM
    w_ih: np.ndarray
    w_hh: np.ndarray
    b_ih: np.ndarray
    b_hh: np.ndarray
    lengths: np.ndarray  # None for a dense batch
    dy: np.ndarray
    dh_n: np.ndarray
    dc_n: np.ndarray  # None except for LSTM


@functools.lru_cache(maxsize=4)
def problem(cell, dtype, shape, seed=0):
    """Random inputs, weights (PyTorch's init range) and upstream gradients for one case:
    seeded, never ones or zeros."""
    T, B, I, H = shape.T, shape.B, shape.I, shape.H
    G = _GATES[cell]
    rng = np.random.default_rng([seed, CELLS.index(cell), DTYPES.index(dtype), T, B, I, H,
                                 shape.ragged])
    k = 1.0 / math.sqrt(H)

    def normal(*s, scale=1.0):
        return (scale * rng.standard_normal(s)).astype(dtype)

    def uniform(*s):
        return rng.uniform(-k, k, s).astype(dtype)

    lstm = cell == "lstm"
    lengths = None
    if shape.ragged:
        lengths = rng.integers(max(1, T // 4), T + 1, size=B).astype(np.int64)
    p = Problem(x=normal(T, B, I), h0=normal(B, H, scale=0.5),
                c0=normal(B, H, scale=0.5) if lstm else None,
                w_ih=uniform(G * H, I), w_hh=uniform(G * H, H),
                b_ih=uniform(G * H), b_hh=uniform(G * H), lengths=lengths,
                dy=normal(T, B, H), dh_n=normal(B, H), dc_n=normal(B, H) if lstm else None)
    for a in vars(p).values():
        if a is not None:
            a.setflags(write=False)  # no runner may modify the shared inputs
    return p


# ------------------------------------------------------------------------------ runners

def runner(impl, case, threads=1):
    """A zero-argument callable that runs one call of ``case`` with ``impl`` and returns
    what check() compares: inference ``(y, h_n[, c_n])``, training the gradients
    ``(dx, dh0[, dc0], dw_ih, dw_hh, db_ih, db_hh)`` (NumPy arrays or torch tensors).
    Raises Unavailable when ``impl`` cannot run here."""
    p = problem(case.cell, case.dtype, case.shape)
    if impl == "rnnfuse":
        from . import functional
        return _kernel_runner(functional, case, p)
    if impl == "prepacked":
        return _prepacked_runner(case, p)
    if impl == "reference":
        from . import reference
        return _kernel_runner(reference, case, p)
    if impl == "torch":
        return _torch_runner(case, p, threads)
    if impl == "onnxruntime":
        return _ort_runner(case, p, threads)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _kernel_runner(mod, case, p):
    fwd = getattr(mod, f"{case.cell}_forward")
    bwd = getattr(mod, f"{case.cell}_backward")
    lstm = case.cell == "lstm"
    states = (p.h0, p.c0) if lstm else (p.h0,)
    args = (p.x, *states, p.w_ih, p.w_hh, p.b_ih, p.b_hh, p.lengths)
    n_out = 3 if lstm else 2
    if not case.training:
        return lambda: fwd(*args, need_ctx=False)[:n_out]
    upstream = (p.dy, p.dh_n, p.dc_n) if lstm else (p.dy, p.dh_n)

    def step():
        ctx = fwd(*args, need_ctx=True)[-1]
        return bwd(*upstream, ctx)
    return step


def _prepacked_runner(case, p):
    if case.training:
        raise NotApplicable("prepacked: inference only")
    from . import functional
    f = functional.Prepacked(case.cell, p.w_ih, p.w_hh, p.b_ih, p.b_hh)
    states = (p.h0, p.c0) if case.cell == "lstm" else (p.h0,)
    return lambda: f(p.x, *states, lengths=p.lengths)


def _import_torch(threads):
    try:
        import torch
    except ImportError:
        raise Unavailable("PyTorch is not installed") from None
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch


def _torch_runner(case, p, threads):
    torch = _import_torch(threads)
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    T, I, H = case.shape.T, case.shape.I, case.shape.H
    tdtype = getattr(torch, case.dtype)
    lstm = case.cell == "lstm"
    if case.cell == "lstm":
        module = torch.nn.LSTM(I, H, dtype=tdtype)
    elif case.cell == "gru":
        module = torch.nn.GRU(I, H, dtype=tdtype)
    else:
        module = torch.nn.RNN(I, H, nonlinearity="tanh", dtype=tdtype)
    with torch.no_grad():
        for name, value in (("weight_ih_l0", p.w_ih), ("weight_hh_l0", p.w_hh),
                            ("bias_ih_l0", p.b_ih), ("bias_hh_l0", p.b_hh)):
            getattr(module, name).copy_(torch.from_numpy(value.copy()))
    params = [module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0]

    def tensor(a, grad=False):
        t = torch.from_numpy(a.copy())
        return t.requires_grad_() if grad else t

    grad = case.training
    x = tensor(p.x, grad)
    h0 = tensor(p.h0[None], grad)
    c0 = tensor(p.c0[None], grad) if lstm else None
    hx = (h0, c0) if lstm else h0
    lengths = None if p.lengths is None else torch.from_numpy(p.lengths.copy())

    def forward():
        if lengths is None:
            y, state = module(x, hx)
        else:
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
            y, state = module(packed, hx)
            y = pad_packed_sequence(y, total_length=T)[0]
        return (y, *state) if lstm else (y, state)

    if not grad:
        def infer():
            with torch.no_grad():
                y, *finals = forward()
            return (y, *(s[0] for s in finals))
        return infer

    upstream = [tensor(p.dy), tensor(p.dh_n[None])] + ([tensor(p.dc_n[None])] if lstm else [])
    inputs = [x, h0] + ([c0] if lstm else []) + params

    def step():
        outputs = forward()
        grads = torch.autograd.grad(outputs, inputs, upstream)
        n = 3 if lstm else 2  # dx, dh0[, dc0] first
        return (grads[0],) + tuple(g[0] for g in grads[1:n]) + tuple(grads[n:])
    return step


def _onnx_model(case, p):
    """One ONNX LSTM/GRU/RNN node with the problem's weights as initializers."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise Unavailable("onnx is not installed (needed to build the ONNX Runtime model)") \
            from None
    T, B, I, H = case.shape.T, case.shape.B, case.shape.I, case.shape.H
    G = _GATES[case.cell]
    from .onnx_weights import _ONNX_FROM_TORCH  # ONNX's gate order
    perm = list(_ONNX_FROM_TORCH[case.cell])

    def gates(w):  # (G*H, ...) in PyTorch's order -> ONNX's order
        return w.reshape(G, H, -1)[perm].reshape(G * H, -1)

    elem = TensorProto.FLOAT if case.dtype == "float32" else TensorProto.DOUBLE
    inits = [numpy_helper.from_array(np.ascontiguousarray(gates(p.w_ih)[None]), "W"),
             numpy_helper.from_array(np.ascontiguousarray(gates(p.w_hh)[None]), "R"),
             numpy_helper.from_array(np.concatenate([gates(p.b_ih).ravel(),
                                                     gates(p.b_hh).ravel()])[None], "B")]
    lstm = case.cell == "lstm"
    graph_inputs = [helper.make_tensor_value_info("X", elem, [T, B, I]),
                    helper.make_tensor_value_info("initial_h", elem, [1, B, H])]
    if lstm:
        graph_inputs.append(helper.make_tensor_value_info("initial_c", elem, [1, B, H]))
    seq = ""
    if p.lengths is not None:
        seq = "sequence_lens"
        graph_inputs.append(helper.make_tensor_value_info(seq, TensorProto.INT32, [B]))
    node_inputs = ["X", "W", "R", "B", seq, "initial_h"] + (["initial_c"] if lstm else [])
    out_names = ["Y", "Y_h"] + (["Y_c"] if lstm else [])
    attrs = {"hidden_size": H}
    if case.cell == "gru":
        attrs["linear_before_reset"] = 1
    if case.cell == "rnn":
        attrs["activations"] = ["Tanh"]
    node = helper.make_node(case.cell.upper(), node_inputs, out_names, **attrs)
    outputs = [helper.make_tensor_value_info("Y", elem, [T, 1, B, H])]
    outputs += [helper.make_tensor_value_info(n, elem, [1, B, H]) for n in out_names[1:]]
    graph = helper.make_graph([node], f"rnnfuse_{case.cell}", graph_inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = min(onnx.IR_VERSION, 8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _ort_runner(case, p, threads):
    if case.training:
        raise NotApplicable("ONNX Runtime: inference only")
    try:
        import onnxruntime as ort
    except ImportError:
        raise Unavailable("ONNX Runtime is not installed") from None
    model = _onnx_model(case, p)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 4  # a probe that fails below is reported, not logged
    feeds = {"X": p.x, "initial_h": p.h0[None]}
    if case.cell == "lstm":
        feeds["initial_c"] = p.c0[None]
    if p.lengths is not None:
        feeds["sequence_lens"] = p.lengths.astype(np.int32)
    try:  # a missing kernel shows at session creation, or (LSTM, GRU double) at run time
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4
        sess.run(None, feeds, quiet)
    except Exception as e:
        why = first_line(e).split("Status Message: ")[-1].split(" : ")[-1]
        raise Unavailable(f"ONNX Runtime cannot run {case.cell} {case.dtype}: "
                          f"{why[:200]}") from None

    def infer():
        y, *finals = sess.run(None, feeds)
        return (y[:, 0], *(s[0] for s in finals))
    return infer


# ------------------------------------------------------------------------------- checks

@functools.lru_cache(maxsize=2)
def reference_result(case):
    """The reference's result for ``case`` (computed once; what check() compares with)."""
    return tuple(_as_numpy(a) for a in runner("reference", case)())


def _as_numpy(a):
    if a is None:
        return None
    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().numpy()
    return np.asarray(a)


def _output_names(case):
    lstm = case.cell == "lstm"
    if not case.training:
        return ("y", "h_n", "c_n") if lstm else ("y", "h_n")
    return (("dx", "dh0", "dc0") if lstm else ("dx", "dh0")) + ("dw_ih", "dw_hh", "db_ih",
                                                               "db_hh")


def check(case, impl, got, want=None):
    """Compare ``got`` (a runner's result) with the reference's; returns the worst relative
    error (max |got - want| / max |want|), raises AssertionError naming the output if it
    is over TOLERANCE[dtype] or a shape, dtype or NaN differs."""
    want = reference_result(case) if want is None else want
    names = _output_names(case)
    got = tuple(_as_numpy(a) for a in got)
    if len(got) != len(names) or len(want) != len(names):
        raise AssertionError(f"{impl} {case.group}: {len(got)} outputs, expected {names}")
    worst = 0.0
    for name, g, w in zip(names, got, want):
        if g.shape != w.shape or g.dtype != w.dtype:
            raise AssertionError(f"{impl} {case.group}: {name} is {g.dtype}{g.shape}, "
                                 f"the reference's {w.dtype}{w.shape}")
        if not np.array_equal(np.isnan(g), np.isnan(w)):
            raise AssertionError(f"{impl} {case.group}: {name} has NaN where the reference "
                                 "has none (or the other way round)")
        scale = float(np.max(np.abs(w), initial=0.0)) or 1.0
        err = float(np.max(np.abs(np.nan_to_num(g.astype(np.float64) - w)), initial=0.0)) / scale
        if not err <= TOLERANCE[case.dtype]:
            raise AssertionError(f"{impl} {case.group}: {name} differs from the reference "
                                 f"by {err:.3g} of its largest value (tolerance "
                                 f"{TOLERANCE[case.dtype]:g})")
        worst = max(worst, err)
    return worst


# ------------------------------------------------------------------------------ timing

def limit_threads(threads):
    """threadpoolctl's limit on every BLAS and OpenMP pool loaded so far (None: no limit)."""
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=threads)


def time_once(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def plan_rounds(seconds_per_call, budget, min_rounds=3, max_rounds=200, min_sample=1e-3):
    """(rounds, iterations): each sample (``iterations`` calls) lasts at least
    ``min_sample`` s, and all the samples together about ``budget`` s."""
    per_call = max(seconds_per_call, 1e-7)
    iterations = max(1, math.ceil(min_sample / per_call))
    rounds = int(budget / (per_call * iterations))
    return max(min_rounds, min(max_rounds, rounds)), iterations


def measure(fns, budget=1.0, min_rounds=3, max_rounds=100, clock=time.perf_counter):
    """Median seconds per call of each of ``fns`` (name -> callable), from interleaved
    rounds in this process: each round runs every callable once (a few times when it is
    very short), in an order rotated from round to round. Garbage collection is off while
    timing. ``clock``: wall time, or time.thread_time (the calling thread's CPU time: for
    one-thread runs on a loaded machine). Returns {name: (median seconds, samples)}."""
    names = list(fns)
    est = {n: min(time_once(fns[n]) for _ in range(2)) for n in names}
    iters = {n: plan_rounds(est[n], budget, min_sample=2e-3)[1] for n in names}
    per_round = sum(est[n] * iters[n] for n in names)
    rounds = max(min_rounds, min(max_rounds, int(budget / max(per_round, 1e-9))))
    samples = {n: [] for n in names}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                fn, k = fns[n], iters[n]
                t = clock()
                for _ in range(k):
                    fn()
                samples[n].append((clock() - t) / k)
    finally:
        if enabled:
            gc.enable()
    return {n: (statistics.median(s), len(s)) for n, s in samples.items()}


def gemm_peak(dtype, threads=1, n=1024):
    """Measured GEMM peak (FLOP/s) of this machine's BLAS: the best of a few ``n x n``
    NumPy matmuls under ``threads`` BLAS threads."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    with limit_threads(threads):
        a @ b
        best = min(time_once(lambda: a @ b) for _ in range(5))
    return 2.0 * n ** 3 / best


def matmul_flops(case):
    """FLOPs of the matrix products of one call, counting only the valid steps:
    forward 2 N G H (I + H), N = the number of valid (step, sequence) pairs; a training
    step three times that (backward: dh W_hh and dx, dW_hh and dW_ih)."""
    s = case.shape
    p = problem(case.cell, case.dtype, s)
    N = int(p.lengths.sum()) if p.lengths is not None else s.T * s.B
    fwd = 2.0 * N * _GATES[case.cell] * s.H * (s.I + s.H)
    return 3 * fwd if case.training else fwd


def _gemm_floor_runner(case):
    """The call's matrix products alone, one BLAS call each (dense shapes only)."""
    from . import _kernels
    s = case.shape
    if s.ragged:
        raise NotApplicable("no GEMM floor for ragged batches")
    buf = _kernels.gemm_floor_buffer(case.cell, s.T, s.B, s.I, s.H, np.dtype(case.dtype))
    return lambda: _kernels.gemm_floor(case.cell, s.T, s.B, s.I, s.H, buf, case.training)


# ----------------------------------------------------------------- threads and memory

def thread_scaling(case, counts=(1, 2), rounds=5, sample=0.05):
    """Median seconds per rnnfuse call of ``case`` at each BLAS thread count of ``counts``
    (the kernels follow the BLAS's count): rounds alternate the order of the counts, the
    limit is set between samples, never inside a timed call, and a sample lasts about
    ``sample`` seconds. Returns {count: median seconds}."""
    from threadpoolctl import ThreadpoolController
    controller = ThreadpoolController()
    fn = runner("rnnfuse", case)
    with controller.limit(limits=counts[0]):
        reps = max(1, int(sample / time_once(fn)))
    samples = {n: [] for n in counts}
    for r in range(rounds):
        for n in (counts if r % 2 == 0 else counts[::-1]):
            with controller.limit(limits=n):
                fn()
                t = time.perf_counter()
                for _ in range(reps):
                    fn()
                samples[n].append((time.perf_counter() - t) / reps)
    return {n: statistics.median(s) for n, s in samples.items()}


def peak_memory(impl, case):
    """Peak bytes allocated through Python and NumPy during one call of ``case`` by ``impl``
    (tracemalloc; outputs, workspace and, for a training step, the ctx included; the C
    kernels' small per-thread scratch is not seen). rnnfuse's kept workspace is released
    first, so the call allocates a fresh one."""
    import tracemalloc

    from . import functional
    fn = runner(impl, case)
    fn()
    functional.release_workspace()
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
        functional.release_workspace()


# ------------------------------------------------------------------------------ serving

@dataclass(frozen=True)
class ServingShape:
    """Many sessions of one unidirectional layer, each stepped one timestep per frame."""
    cell: str
    sessions: int
    I: int  # noqa: E741
    H: int
    layers: int = 1

    @property
    def label(self):
        return (f"{self.sessions} sessions of {self.cell.upper()}({self.I}, {self.H}), "
                f"{self.layers} layer(s)")


SERVING_SHAPES = (ServingShape("lstm", 256, 64, 128), ServingShape("gru", 256, 64, 128),
                  ServingShape("lstm", 64, 64, 128, layers=2))
SERVING_QUICK = (ServingShape("lstm", 16, 8, 16),)
# "pool": one pool.step of all sessions; "streams": each session's own stream of batch 1,
# stepped one after another; "torch" and "onnxruntime": the peer called once per session
# with its state passed in and out; the "-batch" peers: one call over all sessions.
SERVING_IMPLS = ("pool", "streams", "torch", "onnxruntime", "torch-batch",
                 "onnxruntime-batch")
SERVING_FRAME_S = 0.032  # a frame of streamed audio or video: one step per session
_SERVING_CHECK_STEPS = 4


def serving_layer(shape, dtype="float32"):
    """The rnnfuse layer (seeded, eval mode) whose weights every implementation runs."""
    from . import layers
    cls = {"lstm": layers.LSTM, "gru": layers.GRU, "rnn": layers.RNN}[shape.cell]
    return cls(shape.I, shape.H, num_layers=shape.layers, dtype=np.dtype(dtype),
               seed=0).eval()


def serving_stepper(impl, layer, n, threads=1):
    """A callable ``x (n, I) -> y (n, H)`` that advances n sessions of ``layer`` by one
    timestep, row i being session i, each keeping its own state between calls (all
    zeros at first). Raises Unavailable when ``impl`` cannot run here."""
    if impl == "pool":
        pool = layer.stream_pool(n)
        ids = np.array([pool.open() for _ in range(n)], np.int64)
        return lambda x: pool.step(ids, x)
    if impl == "streams":
        streams = [layer.stream(1) for _ in range(n)]
        return lambda x: np.concatenate([s.step(x[i:i + 1]) for i, s in enumerate(streams)])
    if impl in ("torch", "torch-batch"):
        return _torch_sessions(layer, n, impl == "torch-batch", threads)
    if impl in ("onnxruntime", "onnxruntime-batch"):
        return _ort_sessions(layer, n, impl == "onnxruntime-batch", threads)
    raise ValueError(f"impl must be one of {SERVING_IMPLS}, got {impl!r}")


def _torch_sessions(layer, n, batched, threads):
    torch = _import_torch(threads)
    kind = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}
    module = kind[type(layer).__name__](layer.input_size, layer.hidden_size,
                                        num_layers=layer.num_layers,
                                        dtype=getattr(torch, layer.dtype.name))
    module.load_state_dict({k: torch.from_numpy(np.array(v))
                            for k, v in layer.state_dict().items()})
    module.eval()
    lstm = isinstance(module, torch.nn.LSTM)
    L, I, H = layer.num_layers, layer.input_size, layer.hidden_size

    def zeros(rows):
        h = torch.zeros(L, rows, H, dtype=module.weight_hh_l0.dtype)
        return (h, h.clone()) if lstm else h

    if batched:
        state = [zeros(n)]

        def step_all(x):
            with torch.inference_mode():
                y, state[0] = module(torch.from_numpy(x).view(1, n, I), state[0])
            return y[0].numpy()
        return step_all
    states = [zeros(1) for _ in range(n)]

    def step_each(x):
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            ys = []
            for i in range(n):
                y, states[i] = module(xt[i].view(1, 1, I), states[i])
                ys.append(y[0])
            return torch.cat(ys).numpy()
    return step_each


def _serving_onnx_model(layer):
    """The stacked layer as ONNX nodes, one per layer, with the states as inputs and
    outputs (h_l, c_l in; h_l_out, c_l_out out) and a batch dimension left free."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise Unavailable("onnx is not installed (needed to build the ONNX Runtime model)") \
            from None
    from .onnx_weights import to_onnx
    cell, I, H = type(layer).__name__, layer.input_size, layer.hidden_size
    elem = TensorProto.FLOAT if layer.dtype == np.float32 else TensorProto.DOUBLE
    lstm = cell == "LSTM"
    parts = ("h", "c") if lstm else ("h",)
    inputs = [helper.make_tensor_value_info("x", elem, [1, "n", I])]
    outputs, nodes, inits, x = [], [], [], "x"
    for l, w in enumerate(to_onnx(layer)):
        names = {k: f"{k}{l}" for k in ("W", "R", "B")}
        inits += [numpy_helper.from_array(np.ascontiguousarray(w[k]), names[k])
                  for k in names if w[k] is not None]
        for p in parts:
            inputs.append(helper.make_tensor_value_info(f"{p}{l}", elem, [1, "n", H]))
            outputs.append(helper.make_tensor_value_info(f"{p}{l}_out", elem, [1, "n", H]))
        y = f"y{l}"
        node_in = [x, names["W"], names["R"], names["B"] if w["B"] is not None else "", "",
                   *(f"{p}{l}" for p in parts)]
        nodes.append(helper.make_node(cell, node_in, [y, *(f"{p}{l}_out" for p in parts)],
                                      **w["attributes"]))
        inits.append(numpy_helper.from_array(np.array([1], np.int64), f"axis{l}"))
        x = f"x{l + 1}"
        nodes.append(helper.make_node("Squeeze", [y, f"axis{l}"], [x]))  # (1, 1, n, H)
    outputs.insert(0, helper.make_tensor_value_info(x, elem, [1, "n", H]))
    graph = helper.make_graph(nodes, f"rnnfuse_{cell.lower()}_sessions", inputs, outputs,
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = min(onnx.IR_VERSION, 8)
    onnx.checker.check_model(model)
    return model.SerializeToString(), [o.name for o in outputs], parts


def _ort_sessions(layer, n, batched, threads):
    try:
        import onnxruntime as ort
    except ImportError:
        raise Unavailable("ONNX Runtime is not installed") from None
    model, out_names, parts = _serving_onnx_model(layer)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    state_names = out_names[1:]  # h0, c0, h1, ... in the inputs' order, less "_out"
    in_names = [s[:-len("_out")] for s in state_names]
    rows = n if batched else 1
    zeros = np.zeros((1, rows, layer.hidden_size), layer.dtype)
    states = [{k: zeros for k in in_names} for _ in range(1 if batched else n)]

    def run(feeds, x):
        y, *finals = sess.run(out_names, dict(feeds, x=x))
        feeds.update(zip(in_names, finals))
        return y[0]

    if batched:
        return lambda x: run(states[0], x[None])
    return lambda x: np.concatenate([run(states[i], x[None, i:i + 1]) for i in range(n)])


def serving_check(impl, stepper, layer, x):
    """Step ``stepper`` over x (T, n, I) and compare with ``layer.forward(x)``: returns
    the worst relative error, raises AssertionError over TOLERANCE."""
    want = layer.forward(x)[0]
    got = np.stack([stepper(x[t]) for t in range(x.shape[0])])
    if got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(f"serving {impl}: y is {got.dtype}{got.shape}, the layer's "
                             f"{want.dtype}{want.shape}")
    err = float(np.max(np.abs(got.astype(np.float64) - want))) / float(np.max(np.abs(want)))
    if not err <= TOLERANCE[want.dtype.name]:
        raise AssertionError(f"serving {impl}: y differs from the layer's forward by "
                             f"{err:.3g} of its largest value")
    return err


def serving_case(shape, impls, threads=1, budget=1.0, dtype="float32",
                 clock=time.perf_counter):
    """Check every implementation of ``impls`` against the layer's forward over a few
    steps, then time one step of all sessions, interleaved. Returns a row: seconds per
    step of all sessions, per session, sessions per core at SERVING_FRAME_S, the gain
    over the streams loop, and the errors ({impl: why skipped or wrong}). clock: as
    measure's."""
    layer = serving_layer(shape, dtype)
    n = shape.sessions
    x = np.random.default_rng(0).standard_normal(
        (_SERVING_CHECK_STEPS, n, shape.I)).astype(dtype)
    fns, errors = {}, {}
    for impl in impls:
        try:
            stepper = serving_stepper(impl, layer, n, threads)
            serving_check(impl, stepper, layer, x)
        except Unavailable as e:
            errors[impl] = f"skipped ({e})"
            continue
        except AssertionError as e:
            errors[impl] = f"WRONG, not timed: {e}"
            continue
        fns[impl] = functools.partial(stepper, x[0])
    seconds = {k: v[0] for k, v in measure(fns, budget, clock=clock).items()}
    loop = seconds.get("streams")
    return {"cell": shape.cell, "sessions": n, "I": shape.I, "H": shape.H,
            "layers": shape.layers, "dtype": dtype, "threads": threads,
            "seconds": seconds,
            "per_session": {k: s / n for k, s in seconds.items()},
            "sessions_per_core": {k: SERVING_FRAME_S * n / (s * threads)
                                  for k, s in seconds.items()},
            "vs_streams": {k: loop / s for k, s in seconds.items()} if loop else {},
            "errors": errors}


def _serving_table(row, out):
    shape = ServingShape(row["cell"], row["sessions"], row["I"], row["H"], row["layers"])
    print(f"\n{shape.label}, {row['dtype']}, {row['threads']} thread(s)", file=out)
    head = (f"{'impl':18} {'ms/step':>9} {'us/session':>11} {'sessions/core':>14} "
            f"{'vs streams':>11}")
    print(head + "\n" + "-" * len(head), file=out)
    for impl, s in row["seconds"].items():
        gain = row["vs_streams"].get(impl)
        print(f"{impl:18} {_fmt_ms(s):>9} {1e6 * row['per_session'][impl]:>11.2f} "
              f"{row['sessions_per_core'][impl]:>14.0f} "
              f"{f'{gain:.2f}' if gain else '-':>11}", file=out, flush=True)
    for impl, why in row["errors"].items():
        print(f"    {impl}: {why}", file=out)


def _serving_main(args, available):
    """``bench --serving``: the serving table of each shape."""
    impls = ["pool", "streams"] + [i for i in SERVING_IMPLS[2:]
                                   if i.split("-")[0] in available]
    grid = [s for s in (SERVING_QUICK if args.quick else SERVING_SHAPES)
            if s.cell in args.cells]
    print(f"rnnfuse bench --serving: time of one step of every session (median of "
          f"interleaved runs, {_clock_words(args)}); us/session = that time / sessions; "
          f"sessions/core = sessions a core steps in {SERVING_FRAME_S * 1e3:g} ms; vs "
          f"streams = the streams loop's time / this time", flush=True)
    rows = []
    with limit_threads(args.threads):
        for shape in grid:
            for dtype in args.serving_dtypes:
                rows.append(serving_case(shape, impls, args.threads, args.budget, dtype,
                                         _clock(args)))
                _serving_table(rows[-1], sys.stdout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": _machine(args.threads), "frame_s": SERVING_FRAME_S,
                       "serving": rows}, f, indent=1)
        print(f"\nwrote {args.json}")
    wrong = [f"{i} {r['cell']}" for r in rows for i, why in r["errors"].items()
             if why.startswith("WRONG")]
    if wrong:
        print(f"\nFAILED: {', '.join(wrong)} differ from the layer's forward",
              file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- variants

@dataclass(frozen=True)
class Variant:
    """One LSTM cell variant: its rnnfuse.LSTM keywords (from the hidden size) and the
    PyTorch model it is compared with ("loop": a Python loop of nn.LSTMCell, the variant
    in torch ops; "nn.LSTM": torch.nn.LSTM with the same keywords)."""
    name: str
    options: Callable[[int], dict]
    peer: str = "loop"


# A row whose keyword rnnfuse.LSTM does not take (yet) is skipped with a note.
VARIANTS = (
    Variant("plain", lambda H: {}),
    Variant("peepholes", lambda H: {"peepholes": True}),
    Variant("zoneout", lambda H: {"zoneout": 0.1}),
    Variant("recurrent_dropout", lambda H: {"recurrent_dropout": 0.25}),
    Variant("weight_drop", lambda H: {"weight_drop": 0.5}),
    Variant("layer_norm", lambda H: {"layer_norm": True}),
    Variant("projection", lambda H: {"proj_size": H // 2}, peer="nn.LSTM"),
)
VARIANT_SHAPES = (Shape(100, 32, 128, 256), Shape(35, 20, 650, 650))
VARIANT_QUICK = (Shape(6, 3, 5, 8),)


def variant_layer(variant, shape):
    """The seeded float32 rnnfuse.LSTM of ``variant``, every parameter random (peepholes
    and gains too, so that the check sees them), or Unavailable if rnnfuse.LSTM does not
    take the variant's keywords."""
    from . import layers
    opts = variant.options(shape.H)
    try:
        layer = layers.LSTM(shape.I, shape.H, dtype=np.float32, seed=0, **opts)
    except TypeError as e:  # a keyword it does not take
        args = ", ".join(f"{k}={v!r}" for k, v in opts.items())
        raise Unavailable(f"rnnfuse.LSTM({args}): {first_line(e)}") from None
    rng = np.random.default_rng(1)
    k = 1.0 / math.sqrt(shape.H)
    layer.load_state_dict({n: (rng.uniform(-k, k, v.shape) + n.startswith("ln_weight"))
                           .astype(np.float32) for n, v in layer.state_dict().items()})
    return layer


def variant_problem(layer, shape):
    """x (T, B, I) and the upstream gradient dy, shaped as the layer's y."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((shape.T, shape.B, shape.I)).astype(np.float32)
    y = layer.forward(x, need_grad=False)[0]
    return x, rng.standard_normal(y.shape).astype(np.float32)


# rnnfuse.LSTM's parameter names (less "_l0") -> the PyTorch loop model's
_LOOP_NAMES = {"weight_ih": "cell.weight_ih", "weight_hh": "cell.weight_hh",
               "bias_ih": "cell.bias_ih", "bias_hh": "cell.bias_hh", "weight_peep": "peep",
               "ln_weight_ih": "ln_ih.weight", "ln_weight_hh": "ln_hh.weight",
               "ln_weight_c": "ln_c.weight", "ln_bias_c": "ln_c.bias"}


def _torch_names(variant, layer):
    """{rnnfuse name: PyTorch model's name} of every parameter of the layer."""
    if variant.peer == "nn.LSTM":
        return {n: n for n in layer.state_dict()}
    return {n: _LOOP_NAMES[n.removesuffix("_l0")] for n in layer.state_dict()}


def torch_variant_model(variant, layer):
    """The variant as PyTorch users write it, with the layer's weights: torch.nn.LSTM with
    the same keywords (peer "nn.LSTM"), or a Python loop over the steps (``_loop_lstm``)."""
    try:
        import torch
    except ImportError:
        raise Unavailable("PyTorch is not installed") from None
    opts, I, H = variant.options(layer.hidden_size), layer.input_size, layer.hidden_size
    model = (torch.nn.LSTM(I, H, **opts) if variant.peer == "nn.LSTM"
             else _loop_lstm(torch)(I, H, **opts))
    sd = layer.state_dict()
    model.load_state_dict({t: torch.from_numpy(np.array(sd[n]))
                           for n, t in _torch_names(variant, layer).items()})
    return model


@functools.lru_cache(maxsize=1)
def _loop_lstm(torch):
    nn, F = torch.nn, torch.nn.functional

    class LoopLSTM(nn.Module):
        """One LSTM layer as a Python loop of nn.LSTMCell (x: (T, B, I) -> y: (T, B, H),
        zero initial state). Peepholes (ONNX's order i, o, f) and layer norm (with
        nn.LayerNorm) write the cell in torch ops; zoneout, recurrent dropout and weight
        drop are torch ops around it, as rnnfuse.LSTM defines them."""

        def __init__(self, I, H, peepholes=False, layer_norm=False, zoneout=0.0,  # noqa: E741
                     recurrent_dropout=0.0, weight_drop=0.0):
            super().__init__()
            self.cell = nn.LSTMCell(I, H)
            self.peep = nn.Parameter(torch.zeros(3 * H)) if peepholes else None
            self.layer_norm = layer_norm
            if layer_norm:
                self.ln_ih, self.ln_hh = nn.LayerNorm(4 * H, bias=False), \
                    nn.LayerNorm(4 * H, bias=False)
                self.ln_c = nn.LayerNorm(H)
            self.zoneout, self.recurrent_dropout = zoneout, recurrent_dropout
            self.weight_drop = weight_drop

        def forward(self, x):
            h = c = x.new_zeros(x.shape[1], self.cell.hidden_size)
            w_hh, mask = self.cell.weight_hh, None
            if self.training and self.weight_drop:  # one mask per forward
                w_hh = F.dropout(w_hh, self.weight_drop)
            if self.training and self.recurrent_dropout:  # one mask per sequence
                mask = F.dropout(torch.ones_like(h), self.recurrent_dropout)
            ys = []
            for x_t in x:
                h_t, c_t = self.step(x_t, h if mask is None else h * mask, c, w_hh)
                h, c = self.zone(h, h_t), self.zone(c, c_t)
                ys.append(h)
            return torch.stack(ys)

        def zone(self, old, new):
            if not self.zoneout:
                return new
            keep = (torch.empty_like(new).bernoulli_(self.zoneout) if self.training
                    else self.zoneout)
            return keep * old + (1 - keep) * new

        def step(self, x, h, c, w_hh):
            cell = self.cell
            if self.peep is None and not self.layer_norm:
                if w_hh is cell.weight_hh:
                    return cell(x, (h, c))
                return torch.lstm_cell(x, (h, c), cell.weight_ih, w_hh, cell.bias_ih,
                                       cell.bias_hh)  # nn.LSTMCell's op
            if self.layer_norm:
                gates = (self.ln_ih(F.linear(x, cell.weight_ih)) + self.ln_hh(F.linear(h, w_hh))
                         + cell.bias_ih + cell.bias_hh)
            else:
                gates = F.linear(x, cell.weight_ih, cell.bias_ih) + F.linear(h, w_hh,
                                                                             cell.bias_hh)
            i, f, g, o = gates.chunk(4, 1)
            p_i, p_o, p_f = self.peep.chunk(3) if self.peep is not None else (0, 0, 0)
            c = torch.sigmoid(f + p_f * c) * c + torch.sigmoid(i + p_i * c) * torch.tanh(g)
            o = torch.sigmoid(o + p_o * c)
            return o * torch.tanh(self.ln_c(c) if self.layer_norm else c), c

    return LoopLSTM


def _rnnfuse_step(layer, x, dy):
    def step():  # (y, dx); the gradients accumulate in layer.grads
        y = layer.forward(x, need_grad=True)[0]
        return y, layer.backward(dy)[0]
    return step


def _torch_step(model, x, dy):
    import torch
    xt, dyt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(dy)

    def step():  # (y, dx); the gradients accumulate in .grad
        y = model(xt)
        y = y[0] if isinstance(y, tuple) else y  # torch.nn.LSTM: (y, (h_n, c_n))
        y.backward(dyt)
        return y.detach().numpy(), xt.grad.numpy()
    return step


def variant_check(variant, layer, model, x, dy):
    """Both in eval mode (zoneout's expectation, no dropout), from zero gradients: y, dx
    and every parameter's gradient of the PyTorch model against rnnfuse's. Returns the
    worst relative error, raises AssertionError over TOLERANCE naming the output."""
    layer.eval().zero_grad()
    model.eval().zero_grad(set_to_none=True)
    got = dict(zip(("y", "dx"), _torch_step(model, x, dy)()))
    params = dict(model.named_parameters())
    got.update((n, params[t].grad.numpy()) for n, t in _torch_names(variant, layer).items())
    want = dict(zip(("y", "dx"), _rnnfuse_step(layer, x, dy)()))
    want.update(layer.grads)
    worst = 0.0
    for name, w in want.items():
        g = got.get(name)
        if g is None or g.shape != w.shape:
            raise AssertionError(f"torch: {name} is {getattr(g, 'shape', g)}, rnnfuse's "
                                 f"{w.shape}")
        err = float(np.max(np.abs(g - w.astype(np.float64)))) / (float(np.max(np.abs(w)))
                                                                  or 1.0)
        if not err <= TOLERANCE["float32"]:
            raise AssertionError(f"torch: {name} differs from rnnfuse's by {err:.3g} of "
                                 "its largest value")
        worst = max(worst, err)
    layer.train().zero_grad()
    model.train().zero_grad()
    return worst


def own_workspace(fn):
    """fn with a workspace of its own between calls, as a training loop of one model has:
    interleaved with a model of another size, the thread's one spare workspace
    (functional's) would be dropped and allocated anew (page faults) at every call."""
    from . import functional
    own = [None]

    def run():
        functional._SPARE.ws, kept = own[0], getattr(functional._SPARE, "ws", None)
        try:
            return fn()
        finally:
            own[0], functional._SPARE.ws = getattr(functional._SPARE, "ws", None), kept
    return run


def _variant_steps(variant, shape, with_torch):
    """{impl: training step} of one variant, the PyTorch model checked against rnnfuse."""
    layer = variant_layer(variant, shape)
    x, dy = variant_problem(layer, shape)
    steps = {"rnnfuse": own_workspace(_rnnfuse_step(layer, x, dy))}
    if with_torch:
        model = torch_variant_model(variant, layer)
        variant_check(variant, layer, model, x, dy)
        steps["torch"] = _torch_step(model, x, dy)
    return steps


def variant_case(shape, budget=1.0, variants=VARIANTS, with_torch=True,
                 clock=time.perf_counter):
    """Every variant's training step by rnnfuse and (with_torch) by its PyTorch model,
    checked, then all timed interleaved. Returns a row: seconds per step, each rnnfuse
    time over plain rnnfuse's, each torch time over the variant's rnnfuse time, and
    {variant: why skipped or wrong}. clock: as measure's."""
    fns, errors = {}, {}
    for v in variants:
        try:
            steps = _variant_steps(v, shape, with_torch)
        except Unavailable as e:
            errors[v.name] = f"skipped ({e})"
            continue
        except AssertionError as e:
            errors[v.name] = f"WRONG, not timed: {e}"
            continue
        fns.update(((v.name, impl), fn) for impl, fn in steps.items())
    seconds = {k: s for k, (s, _) in measure(fns, budget, clock=clock).items()} if fns else {}
    rf = {v: s for (v, impl), s in seconds.items() if impl == "rnnfuse"}
    pt = {v: s for (v, impl), s in seconds.items() if impl == "torch"}
    plain = rf.get("plain")
    return {"T": shape.T, "B": shape.B, "I": shape.I, "H": shape.H, "dtype": "float32",
            "rnnfuse": rf, "torch": pt,
            "vs_plain": {v: s / plain for v, s in rf.items()} if plain else {},
            "torch_over_rnnfuse": {v: s / rf[v] for v, s in pt.items()},
            "peers": {v.name: v.peer for v in variants}, "errors": errors}


_PEER_LABEL = {"loop": "LSTMCell loop", "nn.LSTM": "nn.LSTM"}


def _variants_table(row, out):
    print(f"\nT{row['T']}xB{row['B']}xI{row['I']}xH{row['H']}, {row['dtype']}: training "
          "step (forward + backward)", file=out)
    head = (f"{'variant':18} {'rnnfuse ms':>10} {'vs plain':>9} {'torch ms':>9} "
            f"{'torch model':14} {'torch x':>8}")
    print(head + "\n" + "-" * len(head), file=out)
    for v, s in row["rnnfuse"].items():
        pt, x = row["torch"].get(v), row["torch_over_rnnfuse"].get(v)
        print(f"{v:18} {_fmt_ms(s):>10} {row['vs_plain'].get(v, 0):>9.3f} {_fmt_ms(pt):>9} "
              f"{_PEER_LABEL[row['peers'][v]] if pt else '-':14} "
              f"{f'{x:.1f}' if x else '-':>8}", file=out, flush=True)
    for v, why in row["errors"].items():
        print(f"    {v}: {why}", file=out)


def _variants_main(args, available):
    """``bench --variants``: the variants' table of each shape."""
    with_torch = "torch" in available
    print(f"rnnfuse bench --variants: LSTM training step, median of interleaved runs "
          f"({_clock_words(args)}), {args.threads} "
          "thread(s); vs plain = this variant's time / the plain cell's; "
          "torch x = the PyTorch model's time / rnnfuse's (checked against rnnfuse in eval "
          "mode first)", flush=True)
    rows = []
    with limit_threads(args.threads):
        for shape in VARIANT_QUICK if args.quick else VARIANT_SHAPES:
            rows.append(variant_case(shape, args.budget, with_torch=with_torch,
                                     clock=_clock(args)))
            rows[-1]["clock"] = args.clock
            _variants_table(rows[-1], sys.stdout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": _machine(args.threads), "variants": rows}, f, indent=1)
        print(f"\nwrote {args.json}")
    wrong = [f"{v} at T{r['T']}xH{r['H']}" for r in rows for v, why in r["errors"].items()
             if why.startswith("WRONG")]
    if wrong:
        print(f"\nFAILED: {', '.join(wrong)}: PyTorch and rnnfuse differ", file=sys.stderr)
        return 1
    return 0


# -------------------------------------------------------------------------- command line

def _parser():
    ap = OneLineParser(
        prog="rnnfuse bench",
        description="Time rnnfuse's kernels against the NumPy reference, PyTorch and ONNX "
                    "Runtime (when installed) on the benchmark grid: median ms per call of "
                    "interleaved runs, and each one's time over rnnfuse's.")
    ap.add_argument("--quick", action="store_true",
                    help="the smoke grid (two small shapes, float32) with a short budget")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for every implementation (default 1)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--plot", metavar="PATH", help="draw a bar chart (needs matplotlib)")
    ap.add_argument("--markdown", metavar="PATH",
                    help="also measure threads and memory, and write the performance "
                         "document (docs/performance.md) to PATH ('-': standard output, "
                         "with the progress table on standard error)")
    ap.add_argument("--vs-threads", type=int, default=2, metavar="N",
                    help="with --markdown: the thread count the threads table compares "
                         "with --threads (default 2; 0: no threads table)")
    ap.add_argument("--cells", default=",".join(CELLS), help="comma-separated subset of "
                    f"{','.join(CELLS)}")
    ap.add_argument("--modes", default=None, help=f"subset of {','.join(MODES)}")
    ap.add_argument("--dtypes", default=None, help=f"subset of {','.join(DTYPES)} "
                    "(default both; float32 with --quick)")
    ap.add_argument("--impls", default=",".join(IMPLS),
                    help=f"subset of {','.join(IMPLS)} (rnnfuse is always run)")
    ap.add_argument("--shapes", default=None, metavar="I,J,...",
                    help="indices into the grid (0-based) to run")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timing per case (default 1.0, 0.2 with --quick)")
    ap.add_argument("--serving", action="store_true",
                    help="instead of the grid: many sessions stepped one timestep each, by "
                         "a stream pool, one stream per session, and the peers per session "
                         "and batched (float32 unless --dtypes; --cells, --impls, --threads, "
                         "--budget, --quick and --json apply)")
    ap.add_argument("--variants", action="store_true",
                    help="instead of the grid: the LSTM's variants (peepholes, zoneout, "
                         "recurrent dropout, weight drop, and layer norm and projection "
                         "where rnnfuse.LSTM has them), training step, float32, against "
                         "the plain cell and against the same model in PyTorch (a loop of "
                         "nn.LSTMCell; nn.LSTM(proj_size)); --impls, --threads, --budget, "
                         "--quick, --json and --clock apply")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="what is timed, wall time (default) or, at one thread and "
                         "without --markdown, the thread's CPU time (steadier on a loaded "
                         "machine)")
    return ap


def _subset(ap, text, allowed, what):
    items = tuple(x for x in text.split(",") if x)
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        ap.error(f"--{what}: {','.join(bad) or 'nothing given'} not in {','.join(allowed)}")
    return items


def _options(argv):
    """The command line, checked and resolved (cells, modes, dtypes, impls, grid, budget):
    a bad flag exits with status 2 before anything runs."""
    ap = _parser()
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for flag in ("markdown", "plot", "shapes", "modes"):
        if args.serving and getattr(args, flag):
            ap.error(f"--{flag} does not apply to --serving")
    for flag in ("markdown", "plot", "shapes", "modes", "dtypes", "serving"):
        if args.variants and getattr(args, flag):
            ap.error(f"--{flag} does not apply to --variants")
    if args.clock == "cpu" and (args.threads != 1 or args.markdown):
        ap.error("--clock cpu applies at --threads 1 only, without --markdown")
    args.cells = _subset(ap, args.cells, CELLS, "cells")
    args.modes = _subset(ap, args.modes or ",".join(MODES), MODES, "modes")
    args.serving_dtypes = _subset(ap, args.dtypes or "float32", DTYPES, "dtypes")
    args.dtypes = _subset(ap, args.dtypes or ("float32" if args.quick else ",".join(DTYPES)),
                          DTYPES, "dtypes")
    args.impls = ("rnnfuse",) + tuple(i for i in _subset(ap, args.impls, IMPLS, "impls")
                                      if i != "rnnfuse")
    if args.threads < 1:
        ap.error("--threads must be at least 1")
    if args.vs_threads < 0 or args.vs_threads == args.threads:
        ap.error(f"--vs-threads must be 0 or a count other than --threads ({args.threads})")
    args.grid = QUICK_GRID if args.quick else GRID
    if args.shapes:
        try:
            args.grid = tuple(args.grid[int(i)] for i in args.shapes.split(","))
        except (ValueError, IndexError):
            ap.error(f"--shapes: indices into a grid of {len(args.grid)} shapes")
    if args.budget is None:
        args.budget = 0.2 if args.quick else 1.0
    if not 0 < args.budget <= 3600:  # NaN fails too
        ap.error(f"--budget must be seconds in (0, 3600], got {args.budget}")
    if args.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
        except ImportError:
            ap.error("--plot needs matplotlib (pip install matplotlib)")
    for path in (args.json, args.plot, args.markdown):
        if path and path != "-" and not os.path.isdir(os.path.dirname(path) or "."):
            ap.error(f"{path}: no such directory")
    return args


def _clock(args):
    """What measure() reads: at one thread, the thread's CPU time counts what every
    implementation runs (each runs on the calling thread there), less what other
    processes take of the core."""
    return time.thread_time if args.clock == "cpu" else time.perf_counter


def _clock_words(args):
    return "CPU time of the one thread" if args.clock == "cpu" else "wall time"


def _load_peers(impls, threads):
    """Import the peers (before threads are limited, so that threadpoolctl sees their pools
    too). Returns (the implementations that run, {missing one: why})."""
    available, missing = [], {}
    for impl in impls:
        try:
            if impl == "torch":
                _import_torch(threads)
            elif impl == "onnxruntime":
                import onnx  # noqa: F401
                import onnxruntime  # noqa: F401
            available.append(impl)
        except (ImportError, Unavailable) as e:
            missing[impl] = str(e) if isinstance(e, Unavailable) else f"{impl}: {e}"
    for why in missing.values():
        print(f"skipped: {why}", file=sys.stderr)
    return available, missing


def _fmt_ms(s):
    if s is None:
        return "-"
    ms = 1e3 * s
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def _ratio(s, rf):
    return f"{s / rf:.2f}" if s is not None and rf else "-"


def _cpu_model():
    """The CPU's name, family and model, and which of AVX2, FMA, AVX-512F it has (Linux's
    /proc/cpuinfo; elsewhere what platform says)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    flags = [f for f in ("avx2", "fma", "avx512f") if f in fields.get("flags", "").split()]
    return (f"{fields['model name']}, family {fields.get('cpu family', '?')} model "
            f"{fields.get('model', '?')}, with {' '.join(flags) or 'no avx2/fma/avx512f'}")


def _machine(threads):
    """What ran: the date, the CPU, the versions, the build and the BLAS (threadpoolctl)."""
    from ._config import config
    cfg = config()  # also loads SciPy's BLAS, the one the kernels call
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "processor": platform.processor(), "threads": threads,
            "rnnfuse": cfg["rnnfuse"], "compile_args": cfg["compile_args"],
            "simd_path": cfg["simd_path"], "kernel": cfg["kernel"],
            "blas": [{k: p.get(k) for k in ("internal_api", "version", "architecture",
                                            "num_threads", "filepath")}
                     for p in cfg["threadpools"] if p.get("user_api") == "blas"],
            "env": {k: os.environ[k] for k in _ENV if k in os.environ}}
    for mod in ("numpy", "scipy", "threadpoolctl", "torch", "onnxruntime", "onnx"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


# the environment that changes what runs, recorded with the results
_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE",
        "OPENBLAS_L2_SIZE", "RNNFUSE_KERNEL")


def _print_intro(machine, peaks, threads, out, clock_words="wall time"):
    print(f"rnnfuse bench: {threads} thread(s), SIMD {machine['simd_path']}, BLAS "
          + ", ".join(f"{b['internal_api']} {b['version']} {b['architecture']}"
                      for b in machine["blas"]), file=out)
    print("GEMM peak (n=1024 matmul): "
          + ", ".join(f"{d} {p / 1e9:.1f} GFLOP/s" for d, p in peaks.items()), file=out)
    print(f"ms per call (median of interleaved runs, {clock_words}); x = that time / rnnfuse's "
          "(above 1: rnnfuse is faster); floor = the call's GEMMs alone; bound = its GEMM "
          "FLOPs at the GEMM peak\n", file=out)


def _table_head(peers):
    return (f"{'cell':5} {'mode':9} {'dtype':7} {'shape':26} {'rnnfuse':>9} "
            + " ".join(f"{_SHORT[i]:>9}" for i in peers)
            + f" {'floor':>9} {'bound':>9} " + " ".join(f"{_SHORT[i] + ' x':>9}" for i in peers)
            + f" {'floor x':>8} {'bound x':>8}")


def _table_line(case, row, peers):
    ms = row["seconds"]
    rf = ms.get("rnnfuse")
    return (f"{case.cell:5} {case.mode:9} {case.dtype:7} {case.shape.label:26} "
            f"{_fmt_ms(rf):>9} "
            + " ".join(f"{_fmt_ms(ms.get(i)):>9}" for i in peers)
            + f" {_fmt_ms(row['floor']):>9} {_fmt_ms(row['bound']):>9} "
            + " ".join(f"{_ratio(ms.get(i), rf):>9}" for i in peers)
            + f" {_ratio(row['floor'], rf):>8} {_ratio(row['bound'], rf):>8}")


def _run_grid(args, available, peaks, out):
    """Check and time every case of the grid, printing a line per case as it finishes.
    Returns (rows, the results that failed their check)."""
    peers = [i for i in available if i != "rnnfuse"]
    head = _table_head(peers)
    print(head, file=out)
    print("-" * len(head), file=out)
    rows, failed, said = [], [], set()
    for case in cases(args.grid, args.cells, args.modes, args.dtypes):
        row = _run_case(case, available, args.threads, args.budget, peaks[case.dtype], failed,
                        _clock(args))
        rows.append(row)
        print(_table_line(case, row, peers), file=out, flush=True)
        for impl, why in row["errors"].items():
            if why not in said:  # each reason once
                said.add(why)
                print(f"    {impl}: {why}", file=out)
    return rows, failed


def _extras(args, available, out):
    """For --markdown: rnnfuse at --threads and --vs-threads, and the peak memory of one
    call (rnnfuse and, when it runs, the reference), per case."""
    counts = (args.threads, args.vs_threads)
    scaling, memory = [], []
    for case in cases(args.grid, args.cells, args.modes, args.dtypes):
        if args.vs_threads:
            scaling.append((case, thread_scaling(case, counts)))
            print(f"threads {case.group}: " + ", ".join(
                f"{n}: {_fmt_ms(s)} ms" for n, s in scaling[-1][1].items()), file=out,
                flush=True)
        impls = [i for i in ("rnnfuse", "reference") if i in available]
        memory.append((case, {i: peak_memory(i, case) for i in impls}))
    return {"counts": counts, "scaling": scaling, "memory": memory}


def _write_outputs(args, report, out):
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: report[k] for k in ("machine", "gemm_peak_flops", "budget_s",
                                              "skipped", "rows")}, f, indent=1)
        print(f"\nwrote {args.json}", file=out)
    if args.plot:
        _plot(report["rows"], args.plot, args.threads)
        print(f"wrote {args.plot}", file=out)
    if args.markdown:
        from . import _perfdoc
        text = _perfdoc.render(args, report)
        if args.markdown == "-":
            sys.stdout.write(text)
        else:
            with open(args.markdown, "w") as f:
                f.write(text)
            print(f"wrote {args.markdown}", file=out)


def main(argv=None):
    args = _options(argv)
    out = sys.stderr if args.markdown == "-" else sys.stdout
    available, missing = _load_peers(args.impls, args.threads)
    if args.serving:
        return _serving_main(args, available)
    if args.variants:
        return _variants_main(args, available)
    with limit_threads(args.threads):  # threadpoolctl restores the limits on the way out
        machine = _machine(args.threads)
        peaks = {d: gemm_peak(d, args.threads) for d in args.dtypes}
        _print_intro(machine, peaks, args.threads, out, _clock_words(args))
        rows, failed = _run_grid(args, available, peaks, out)
        extras = _extras(args, available, out) if args.markdown else None
    if hasattr(os, "getloadavg"):
        machine["loadavg_after"] = os.getloadavg()
    report = {"machine": machine, "gemm_peak_flops": peaks, "budget_s": args.budget,
              "skipped": missing, "rows": rows, "available": available, "failed": failed,
              "extras": extras}
    _write_outputs(args, report, out)
    if failed:
        print(f"\nFAILED: {len(failed)} result(s) differ from the reference: "
              + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


_SHORT = {"rnnfuse": "rnnfuse", "prepacked": "packed", "reference": "ref", "torch": "torch",
          "onnxruntime": "ort"}


def _run_case(case, impls, threads, budget, peak, failed, clock=time.perf_counter):
    """Check each implementation once against the reference, then time them interleaved."""
    fns, errors, checks = {}, {}, {}
    for impl in impls:
        try:
            fn = runner(impl, case, threads)
        except NotApplicable:
            continue
        except Unavailable as e:
            errors[impl] = f"skipped ({e})"
            continue
        try:
            checks[impl] = check(case, impl, fn())
        except AssertionError as e:
            errors[impl] = f"WRONG, not timed: {e}"
            failed.append(f"{impl} {case.group}")
            continue
        fns[impl] = fn
    try:
        fns["floor"] = _gemm_floor_runner(case)
        fns["floor"]()
    except NotApplicable:
        fns.pop("floor", None)
    timed = measure(fns, budget, clock=clock) if fns else {}
    floor = timed.pop("floor", (None, 0))[0]
    s = case.shape
    return {"cell": case.cell, "mode": case.mode, "dtype": case.dtype, "T": s.T, "B": s.B,
            "I": s.I, "H": s.H, "ragged": s.ragged, "group": case.group,
            "seconds": {k: v[0] for k, v in timed.items()},
            "samples": {k: v[1] for k, v in timed.items()},
            "floor": floor, "bound": matmul_flops(case) / peak,
            "max_rel_err": checks, "errors": errors}


def _plot(rows, path, threads):
    import matplotlib.pyplot as plt
    panels = sorted({(r["mode"], r["dtype"]) for r in rows})
    impls = [i for i in IMPLS if any(i in r["seconds"] for r in rows)]
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(10, 1 + 0.9 * len(rows)))
    for ax, (mode, dtype) in zip(axes[:, 0], panels):
        sel = [r for r in rows if (r["mode"], r["dtype"]) == (mode, dtype)]
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            ys = [j + k * width for j in range(len(sel))]
            ms = [1e3 * r["seconds"].get(impl, float("nan")) for r in sel]
            ax.barh(ys, ms, height=width, label=impl)
        ax.set_yticks([j + 0.4 - width / 2 for j in range(len(sel))])
        ax.set_yticklabels([f"{r['cell']} {r['group'].split('-', 3)[3]}" for r in sel],
                           fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ms per call (log scale; shorter is faster)")
        ax.set_title(f"{mode}, {dtype}, {threads} thread(s)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
