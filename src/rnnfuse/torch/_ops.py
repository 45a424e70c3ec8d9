"""The kernels as PyTorch operators (torch.library): torch.ops.rnnfuse.lstm, gru, rnn and
their backward operators, with fake (shape) functions and autograd."""
from __future__ import annotations

import functools
import threading
import zlib

import torch

from .. import _kernels, functional as F
from ._common import _FIRST_ORDER, _N_STATES, _STATE_NAMES, _kernel_option, _lengths_np, \
    _nested_derivative, _np, _on_torch_threads, _recording
from ._onnx import _register_onnx

# ---------------------------------------------------------------- custom operators

# The same kernels as PyTorch operators (torch.library), for what records operators rather
# than running Python: torch.compile (no graph break), torch.export (dynamic T and B),
# torch.jit.trace, torch.func. Per cell, forward and backward:
#
#   y, h_n, c_n, ws = torch.ops.rnnfuse.lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths,
#                                            reverse, train)
#   y, h_n, ws = torch.ops.rnnfuse.gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
#                                      linear_before_reset, train)
#   y, h_n, ws = torch.ops.rnnfuse.rnn(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
#                                      nonlinearity, train)
#   dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh = torch.ops.rnnfuse.lstm_backward(
#       dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse)
#   dx, dh0, dw_ih, dw_hh, db_ih, db_hh = torch.ops.rnnfuse.gru_backward(
#       dy, dh_n, x, h0, w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse, linear_before_reset)
#                                                  (rnn_backward: nonlinearity last)
#
# Arguments as rnnfuse.functional's (time-major; None for zero states, absent biases and
# full lengths; lengths an int64 tensor); backward takes the forward's. ``ws`` is the
# training workspace that functional's ctx holds, as a 1-D tensor: with train=False it is
# empty (nothing is kept for backward). Its size without lengths is a fixed formula in T,
# B, T*B for given (I, H) (_workspace_size); with lengths it depends on their values (an
# unbacked size under tracing). Backward only reads ws: the kernels write its gradients
# into a pooled buffer of ws's layout rather than over the saved state (as the eager path
# does), so that no saved tensor is mutated, which torch.compile would answer with a copy
# of ws before every backward. The gradient of an absent bias is an empty tensor.
# Autograd is registered on the forwards: their gradient is the backward operator.

_OPTION = {"lstm": "", "gru": ", bool linear_before_reset", "rnn": ", str nonlinearity"}


def _schemas(cell):
    """The forward's and the backward's schema (torch.library's syntax)."""
    states = _STATE_NAMES[cell]
    inputs = ("Tensor x, " + "".join(f"Tensor? {s}0, " for s in states)
              + "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, ")
    fwd = (f"({inputs}Tensor? lengths, bool reverse{_OPTION[cell]}, bool train) -> ("
           + ", ".join(["Tensor"] * (len(states) + 2)) + ")")
    bwd = ("(Tensor? dy, " + "".join(f"Tensor? d{s}_n, " for s in states)
           + f"{inputs}Tensor ws, Tensor? lengths, bool reverse{_OPTION[cell]}) -> ("
           + ", ".join(["Tensor"] * (5 + len(states))) + ")")
    return fwd, bwd


def _option(cell, option):
    """An operator's option as functional's forward takes it (None for the LSTM)."""
    return () if cell == "lstm" else (option,)


@functools.lru_cache(maxsize=None)
def _workspace_terms(cell, I, H, reverse):
    """(a, b, c, d) with the training workspace of a call without lengths a + b*T + c*B +
    d*T*B elements, read from the kernels' own sizes at four small shapes."""
    n = {(T, B): _kernels.workspace_size(cell, F._full_plan(T, B, reverse), I, H, True)
         for T in (1, 2) for B in (1, 2)}
    d = n[2, 2] - n[2, 1] - n[1, 2] + n[1, 1]
    b, c = n[2, 1] - n[1, 1] - d, n[1, 2] - n[1, 1] - d
    return n[1, 1] - b - c - d, b, c, d


def _workspace_size(cell, T, B, I, H, reverse):
    """The training workspace's elements without lengths (T and B may be symbolic; I and
    H are made concrete: the packed weights' size rounds them)."""
    a, b, c, d = _workspace_terms(cell, int(I), int(H), bool(reverse))
    return a + b * T + c * B + d * T * B


@functools.lru_cache(maxsize=None)
def _pack_size(cell, I, H):
    """Elements of the packed weights' room, the training workspace's last part."""
    return _kernels.workspace_weights_size(cell, I, H)


# The operators' training workspaces, and the buffers their backward writes into, come
# from a small per-thread pool of buffers, reused once nothing else holds them (by their
# storage's use count; a graph kept with retain_graph=True holds its own): as functional
# keeps a spare workspace, for fresh memory costs page faults on every call.
_POOL = threading.local()
_POOL_SIZE = 8


def _storage_users(t):
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _pooled_empty(n, like):
    """An uninitialised 1-D tensor of n elements of like's dtype: a view of a pooled
    buffer that nothing else uses, else of a new pooled buffer."""
    pool = _POOL.__dict__.setdefault("buffers", [])
    for buf in pool:
        if buf.dtype == like.dtype and n <= buf.numel() <= 2 * n and _storage_users(buf) == 2:
            return buf[:n]  # (the pool's tensor and the storage object above: nobody else)
    buf = like.new_empty(n)
    pool.append(buf)
    del pool[:-_POOL_SIZE]
    return buf[:n]


def release_workspace() -> None:
    """Free the workspaces this thread keeps for its next calls: those of the operators
    (training under torch.compile, torch.export, torch.func) and functional's."""
    _POOL.__dict__.pop("buffers", None)
    F.release_workspace()



class _CellOps:
    """The operators of one cell: their Python bodies, fake functions and autograd.
    Arguments arrive flat, in the schemas' order; ``split`` and ``split_backward`` name
    them."""

    def __init__(self, cell):
        self.cell, self.n, self.G = cell, _N_STATES[cell], F._GATES[cell]

    def split(self, args):
        """forward's args: x, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, option, train."""
        n = self.n
        w_ih, w_hh, b_ih, b_hh, lengths, reverse = args[1 + n:7 + n]
        option = args[7 + n] if self.cell != "lstm" else None
        return args[0], args[1:1 + n], w_ih, w_hh, b_ih, b_hh, lengths, reverse, option, args[-1]

    def split_backward(self, args):
        """backward's args: (dy, dfinals...), then forward's tensors, ws, lengths, reverse,
        option."""
        n = self.n
        x, states = args[1 + n], args[2 + n:2 + 2 * n]
        w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse = args[2 + 2 * n:9 + 2 * n]
        option = args[9 + 2 * n] if self.cell != "lstm" else None
        return args[:1 + n], x, states, w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse, option

    # ------------------------------------------------ the operators' bodies

    def run_forward(self, x, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, option, train):
        """The kernels' forward: y, finals, and ws (a tensor; with train=False empty, else
        the workspace)."""
        cell = self.cell
        arrays = (_np(x), [_np(s) for s in states], _np(w_ih), _np(w_hh), _np(b_ih),
                  _np(b_hh), _lengths_np(lengths), reverse)
        if not train:
            y, finals, _ = F._forward(cell, *arrays, _kernel_option(cell, option), False)
            return y, finals, x.new_empty(0)
        ws = []

        def workspace(size, dtype):
            w = _pooled_empty(size, x)
            self.zero_unwritten(w, size, x, w_hh, lengths)
            ws.append(w)
            return w.numpy()

        y, finals = F._checked_forward(cell, *arrays, _kernel_option(cell, option), True,
                                       workspace)[:2]
        return y, finals, ws[0]

    def zero_unwritten(self, w, size, x, w_hh, lengths):
        """Zero what the kernels leave unwritten in the workspace w (an operator's outputs
        are a function of its inputs, not of memory's garbage): the summed bias without
        biases, the packed weights' padding, with lengths the steps' scratch of empty rows."""
        if lengths is not None:
            w.zero_()
        else:
            w[:w_hh.shape[0]].zero_()  # G*H
            w[size - _pack_size(self.cell, x.shape[2], w_hh.shape[1]):].zero_()

    @_on_torch_threads
    def forward(self, *args):
        if torch.onnx.is_in_onnx_export():  # the exporter traces this call: translate it
            _register_onnx()
        y, finals, ws = self.run_forward(*self.split(args))
        return (torch.from_numpy(y), *(torch.from_numpy(f) for f in finals), ws)

    def forward_fake(self, *args):
        x, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, option, train = self.split(args)
        _kernel_option(self.cell, option)  # checked while tracing too
        T, B, I = x.shape
        H = w_hh.shape[1]
        if not train:
            ws = x.new_empty(0)
        elif lengths is None:
            ws = x.new_empty(_workspace_size(self.cell, T, B, I, H, reverse))
        else:  # the rows that take part, and so the size, depend on the lengths' values
            ws = x.new_empty(torch.library.get_ctx().new_dynamic_size())
        return (x.new_empty(T, B, H), *(x.new_empty(B, H) for _ in range(self.n)), ws)

    @_on_torch_threads
    def backward(self, *args):
        douts, x, states, w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse, option = \
            self.split_backward(args)
        ctx = self.backward_context(x, w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse, option)
        ctx.ws = ws.detach().numpy()
        out = _pooled_empty(ws.numel(), x)  # what the kernels write; ws stays as it was
        grads = F._backward(self.cell, _np(douts[0]), [_np(d) for d in douts[1:]], ctx,
                            keep_spare=False, out=out.numpy())
        return tuple(x.new_empty(0) if g is None else torch.from_numpy(g) for g in grads)

    def backward_context(self, x, w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse, option):
        """functional's ctx for a backward over ws (its saved state set later), after
        checking the forward's arguments and ws against each other, each by its name."""
        xn = F._check_x(_np(x))
        dtype, (T, B, I) = F._dtype_of(xn), xn.shape
        H, w_ih, w_hh, b_ih, b_hh = F._check_weights(self.cell, dtype, _np(w_ih), _np(w_hh),
                                                      _np(b_ih), _np(b_hh), xn.shape)
        ctx = F.Context()
        ctx.cell, ctx.dtype, ctx.x, ctx.w_ih, ctx.w_hh = self.cell, dtype, xn, w_ih, w_hh
        ctx.plan = F._plan(_lengths_np(lengths), T, B, bool(reverse))
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        ctx.option = _kernel_option(self.cell, option)
        ctx.input_size, ctx.hidden_size = I, H
        size = _kernels.workspace_size(self.cell, ctx.plan, I, H, True)
        if ws.numel() == 0:
            raise ValueError("ws is empty: the forward ran with train=False")
        if ws.dtype != x.dtype or ws.dim() != 1 or ws.numel() != size \
                or not ws.is_contiguous():
            raise ValueError(f"ws must be the forward's workspace: 1-D, contiguous, {size} "
                             f"elements of {x.dtype}, got {ws.dtype} {tuple(ws.shape)}")
        return ctx

    def backward_fake(self, *args):
        douts, x, states, w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse, option = \
            self.split_backward(args)
        T, B, I = x.shape
        G, H = self.G, w_hh.shape[1]
        return (x.new_empty(T, B, I), *(x.new_empty(B, H) for _ in range(self.n)),
                x.new_empty(G * H, I), x.new_empty(G * H, H),
                x.new_empty(0 if b_ih is None else G * H),
                x.new_empty(0 if b_hh is None else G * H))

    # ------------------------------------------------ autograd

    def save(self, ctx, inputs, output):
        x, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, option, train = \
            self.split(inputs)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(output[-1])
        ctx.save_for_backward(*inputs[:6 + self.n], output[-1])  # tensors, ws
        ctx.reverse, ctx.option, ctx.train = reverse, option, train

    def gradient(self, ctx, *grads):
        """The forwards' gradient."""
        n = self.n
        *saved, ws = ctx.saved_tensors
        x, states, (w_ih, w_hh, b_ih, b_hh, lengths) = saved[0], saved[1:1 + n], saved[1 + n:]
        opt = _option(self.cell, ctx.option)
        if torch.is_grad_enabled() and not _recording() or _nested_derivative():
            raise RuntimeError(_FIRST_ORDER)
        with torch.no_grad():  # torch.func's grad runs backward with create_graph=True
            if not ctx.train:  # the forward kept nothing (it ran without autograd): replay
                ws = self.fwd(x, *states, w_ih, w_hh, b_ih, b_hh, lengths, ctx.reverse, *opt,
                              True)[-1]
            out = self.bwd(*grads[:1 + n], x, *states, w_ih, w_hh, b_ih, b_hh, ws, lengths,
                           ctx.reverse, *opt)
        dx, dstates, (dw_ih, dw_hh, db_ih, db_hh) = out[0], out[1:1 + n], out[1 + n:]
        return (dx, *(d if s is not None else None for d, s in zip(dstates, states)),
                dw_ih, dw_hh, db_ih if b_ih is not None else None,
                db_hh if b_hh is not None else None, None, None, *(None,) * len(opt), None)

    def vmap(self, apply, info, in_dims, *args):
        """A batching rule: examples that share the weights are one call (``apply``) over
        a batch of N*B rows; examples with weights of their own, one call each."""
        N = info.batch_size
        x, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, option, train = self.split(args)
        dims = self.split(in_dims)
        if any(d is not None for d in dims[2:6]):
            outs = [apply(*(a if d is None else a.select(d, k) for a, d in zip(args, in_dims)))
                    for k in range(N)]
            *outs, ws = zip(*outs)
            return ((*(torch.stack(o) for o in outs), torch.cat(ws)),
                    (0,) * len(outs) + (None,))
        x1 = _example_rows(x, dims[0], 1, N)
        T, NB = x1.shape[:2]
        y, *finals, ws = apply(x1, *(_example_rows(s, d, 0, N) for s, d in zip(states, dims[1])),
                               w_ih, w_hh, b_ih, b_hh, _example_rows(lengths, dims[6], 0, N),
                               *args[6 + self.n:])
        return ((y.reshape(T, N, NB // N, -1), *(f.reshape(N, NB // N, -1) for f in finals),
                 ws), (1,) + (0,) * len(finals) + (None,))

    def vmap_backward(self, info, in_dims, *args):
        """The backward operator's batching rule (vmap over grad, whose cotangents are
        batched): one backward per example, over its slice of each batched argument, each
        with a workspace of its own from a replay of its forward (the one that vmap hands
        in may hold the rows of every example)."""
        outs = [self.backward_of_example(*(a if d is None else a.select(d, k)
                                           for a, d in zip(args, in_dims)))
                for k in range(info.batch_size)]
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])

    def backward_of_example(self, *args):
        """The backward operator over one example, its workspace from a replay."""
        douts, x, states, w_ih, w_hh, b_ih, b_hh, _, lengths, reverse, option = \
            self.split_backward(args)
        tensors = (x, *states, w_ih, w_hh, b_ih, b_hh)
        rest = (lengths, reverse, *_option(self.cell, option))
        ws = self.fwd(*tensors, *rest, True)[-1]
        return self.bwd(*douts, *tensors, ws, *rest)

    # ------------------------------------------------ definition

    def define(self):
        """Define torch.ops.rnnfuse.<cell> and <cell>_backward with their fake functions
        and the forward's autograd formula; self.fwd and self.bwd are their overloads.
        Defined with torch.library.Library rather than torch.library.custom_op, whose
        wrappers around the kernel (checks of the outputs, a second autograd layer) cost
        more per call than what runs here, compiled or not."""
        cell = self.cell
        fwd_schema, bwd_schema = _schemas(cell)
        for name, schema, body, fake in ((cell, fwd_schema, self.forward, self.forward_fake),
                                         (cell + "_backward", bwd_schema, self.backward,
                                          self.backward_fake)):
            _LIB.define(name + schema)
            _LIB.impl(name, body, "CPU")
            torch.library.register_fake(f"rnnfuse::{name}", fake, lib=_LIB)
        self.fwd = getattr(torch.ops.rnnfuse, cell).default
        self.bwd = getattr(torch.ops.rnnfuse, cell + "_backward").default
        torch.library.register_autograd(f"rnnfuse::{cell}", self.gradient,
                                        setup_context=self.save, lib=_LIB)
        _LIB.impl(cell + "_backward", _not_differentiable(self.bwd), "Autograd",
                  with_keyset=True)
        torch.library.register_vmap(f"rnnfuse::{cell}_backward", self.vmap_backward, lib=_LIB)
        return self


_LIB = torch.library.Library("rnnfuse", "DEF")


def _layout_tag():
    """A tag of the workspace layout and the operators' schemas: a compiled graph holds
    its operators' workspace sizes and what they mutate, while torch's compile caches key
    on torch's own code, not on a rebuild or an upgrade of ours."""
    sizes = [_kernels.workspace_size(cell, F._full_plan(T, B, False), I, H, True)
             for cell in ("lstm", "gru", "rnn") for T, B, I, H in ((1, 1, 1, 1), (3, 2, 5, 7))]
    schemas = [_schemas(cell) for cell in _N_STATES]
    return f"rnnfuse-layout-{zlib.crc32(repr((sizes, schemas)).encode()):08x}"


def _tag_compile_caches():
    """Add the layout tag to torch.compile's cache keys (torch.compiler.config.cache_key_tag,
    kept with any tag already set), so that an upgrade of rnnfuse recompiles graphs."""
    config, tag = torch.compiler.config, _layout_tag()
    if tag not in config.cache_key_tag.split(";"):
        config.cache_key_tag = ";".join(filter(None, (config.cache_key_tag, tag)))


_tag_compile_caches()


def _not_differentiable(op):
    """The Autograd kernel of an operator without a derivative (the backward operators):
    the operator below autograd, its outputs recording nothing."""

    def kernel(keyset, *args):
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    return kernel


def _example_rows(a, d, at, N):
    """a's vmap example dim d (None: shared by the N examples) next to its batch dim
    ``at``, the two merged into one of N times the rows."""
    if a is None:
        return None
    a = a.unsqueeze(at).expand(*a.shape[:at], N, *a.shape[at:]) if d is None \
        else a.movedim(d, at)
    return a.reshape(*a.shape[:at], -1, *a.shape[at + 2:])


def _functions(ops):
    """The forward operator as autograd Functions: OpFunction, with setup_context, which
    torch.func's transforms take (they do not take an operator's registered autograd),
    and a batching rule for vmap. CompiledFunction: OpFunction as Dynamo traces it (ctx
    first in forward)."""

    class OpFunction(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return ops.fwd(*args)

        setup_context = staticmethod(ops.save)

        @staticmethod
        def backward(ctx, *grads):
            return ops.gradient(ctx, *grads)

        @staticmethod
        def vmap(info, in_dims, *args):
            return ops.vmap(OpFunction.apply, info, in_dims, *args)

    class CompiledFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = ops.fwd(*args)
            ops.save(ctx, args, out)
            return out

        backward = OpFunction.backward

    return OpFunction, CompiledFunction


def _define_ops(cell):
    """(forward overload, backward overload, OpFunction, CompiledFunction) of a cell."""
    ops = _CellOps(cell).define()
    return (ops.fwd, ops.bwd, *_functions(ops))


_OPS = {cell: _define_ops(cell) for cell in _N_STATES}


# A PackedSequence's data to and from a padded batch, as operators: torch.compile does not
# trace torch.nn.utils.rnn's pad_packed_sequence and pack_padded_sequence, and the batch
# size of a packed batch is a value (batch_sizes[0]), which the fake function gives as a
# dynamic size. Rows in the packing's (sorted) order:
#
#   x, lengths = torch.ops.rnnfuse.unpack(data, batch_sizes)   # (T, B, *), (B,)
#   data = torch.ops.rnnfuse.pack(x, lengths, rows)             # (rows, *)

_LIB.define("unpack(Tensor data, Tensor batch_sizes) -> (Tensor, Tensor)")
_LIB.define("pack(Tensor x, Tensor lengths, SymInt rows) -> Tensor")


@torch.library.impl(_LIB, "unpack", "CPU")
def _unpack(data, batch_sizes):
    return torch._VF._pad_packed_sequence(data, batch_sizes, False, 0.0, batch_sizes.numel())


@torch.library.impl(_LIB, "pack", "CPU")
def _pack(x, lengths, rows):
    return torch._VF._pack_padded_sequence(x, lengths, False)[0]


@torch.library.register_fake("rnnfuse::unpack", lib=_LIB)
def _unpack_fake(data, batch_sizes):
    B = torch.library.get_ctx().new_dynamic_size()
    return (data.new_empty(batch_sizes.shape[0], B, *data.shape[1:]),
            batch_sizes.new_empty(B))


@torch.library.register_fake("rnnfuse::pack", lib=_LIB)
def _pack_fake(x, lengths, rows):
    return x.new_empty(rows, *x.shape[2:])


def _unpack_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.rows = inputs[0].shape[0]


def _unpack_gradient(ctx, dx, _):
    (lengths,) = ctx.saved_tensors
    return torch.ops.rnnfuse.pack(dx, lengths, ctx.rows), None


def _pack_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.steps = inputs[0].shape[0]


def _pack_gradient(ctx, ddata):
    (lengths,) = ctx.saved_tensors
    batch_sizes = (lengths.unsqueeze(0) > torch.arange(ctx.steps).unsqueeze(1)).sum(1)
    return torch.ops.rnnfuse.unpack(ddata, batch_sizes)[0], None, None


torch.library.register_autograd("rnnfuse::unpack", _unpack_gradient,
                                setup_context=_unpack_context, lib=_LIB)
torch.library.register_autograd("rnnfuse::pack", _pack_gradient,
                                setup_context=_pack_context, lib=_LIB)
