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
# of ws before every backward (layer norm's and the projection's backwards work in place:
# on a pooled copy of ws). The gradient of an absent bias is an empty tensor.
# Autograd is registered on the forwards: their gradient is the backward operator.
#
# rnnfuse's cell variants are trailing arguments of both, absent by default (so a call
# without them is as before): the parameters (LSTM: w_hr (P, H), peepholes (3H,), layer
# norm's g_ih, g_hh, g_c, b_c; GRU: g_ih, g_hh), whose gradients the backward returns
# after the biases' (empty where absent), then the masks (zoneout_h and the LSTM's
# zoneout_c (T, B, H), recurrent_dropout (B, H)) and zoneout_p, eval's zoneout (0: none).

_OPTION = {"lstm": "", "gru": ", bool linear_before_reset", "rnn": ", str nonlinearity"}
_PARAMETERS = {"lstm": ("w_hr", "peepholes", *F._LN_NAMES["lstm"]), "gru": F._LN_NAMES["gru"],
               "rnn": ()}
_MASKS = {"lstm": ("zoneout_h", "zoneout_c", "recurrent_dropout"),
          "gru": ("zoneout_h", "recurrent_dropout"), "rnn": ("zoneout_h", "recurrent_dropout")}


def _schemas(cell):
    """The forward's and the backward's schema (torch.library's syntax)."""
    states = _STATE_NAMES[cell]
    inputs = ("Tensor x, " + "".join(f"Tensor? {s}0, " for s in states)
              + "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, ")
    variants = ("".join(f", Tensor? {v}=None" for v in _PARAMETERS[cell] + _MASKS[cell])
                + ", float zoneout_p=0.0")
    fwd = (f"({inputs}Tensor? lengths, bool reverse{_OPTION[cell]}, bool train{variants}) -> ("
           + ", ".join(["Tensor"] * (len(states) + 2)) + ")")
    bwd = ("(Tensor? dy, " + "".join(f"Tensor? d{s}_n, " for s in states)
           + f"{inputs}Tensor ws, Tensor? lengths, bool reverse{_OPTION[cell]}{variants}) -> ("
           + ", ".join(["Tensor"] * (5 + len(states) + len(_PARAMETERS[cell]))) + ")")
    return fwd, bwd


def _option(cell, option):
    """An operator's option as functional's forward takes it (None for the LSTM)."""
    return () if cell == "lstm" else (option,)


def _kernel_workspace_size(cell, plan, I, H, layer_norm=False, P=0):
    """The kernels' training workspace size: of the cell, the layer-normalized cell, or
    the LSTM with a projection of P units."""
    if P:
        return _kernels.lstmp_workspace_size(plan, I, H, P, True)
    return _kernels.workspace_size(cell, plan, I, H, True, layer_norm)


@functools.lru_cache(maxsize=None)
def _workspace_terms(cell, I, H, reverse, layer_norm=False, P=0):
    """(a, b, c, d) with the training workspace of a call without lengths a + b*T + c*B +
    d*T*B elements, read from the kernels' own sizes at four small shapes."""
    n = {(T, B): _kernel_workspace_size(cell, F._full_plan(T, B, reverse), I, H, layer_norm,
                                        P)
         for T in (1, 2) for B in (1, 2)}
    d = n[2, 2] - n[2, 1] - n[1, 2] + n[1, 1]
    b, c = n[2, 1] - n[1, 1] - d, n[1, 2] - n[1, 1] - d
    return n[1, 1] - b - c - d, b, c, d


def _workspace_size(cell, T, B, I, H, reverse, layer_norm=False, P=0):
    """The training workspace's elements without lengths (T and B may be symbolic; I, H
    and P are made concrete: the packed weights' size rounds them)."""
    a, b, c, d = _workspace_terms(cell, int(I), int(H), bool(reverse), bool(layer_norm),
                                  int(P))
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
    Arguments arrive flat, in the schemas' order (the trailing variants possibly left out
    or by name); ``split`` and ``split_backward`` name them."""

    def __init__(self, cell):
        self.cell, self.n, self.G = cell, _N_STATES[cell], F._GATES[cell]
        self.parameters = _PARAMETERS[cell]
        self.names = self.parameters + _MASKS[cell] + ("zoneout_p",)

    def variants(self, given, kwargs):
        """The variant arguments in the schemas' order, their defaults where not given."""
        v = [*given, *(None,) * (len(self.names) - 1 - len(given)), 0.0][:len(self.names)]
        for name, value in kwargs.items():
            v[self.names.index(name)] = value
        return tuple(v)

    def split(self, args, kwargs=None):
        """forward's args: x, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, option,
        train, variants."""
        n, k = self.n, 7 + self.n + (self.cell != "lstm")  # k: train's place
        w_ih, w_hh, b_ih, b_hh, lengths, reverse = args[1 + n:7 + n]
        option = args[7 + n] if self.cell != "lstm" else None
        return (args[0], args[1:1 + n], w_ih, w_hh, b_ih, b_hh, lengths, reverse, option,
                args[k], self.variants(args[k + 1:], kwargs or {}))

    def split_backward(self, args, kwargs=None):
        """backward's args: (dy, dfinals...), then forward's tensors, ws, lengths, reverse,
        option, variants."""
        n, k = self.n, 9 + 2 * self.n + (self.cell != "lstm")  # k: the variants' place
        x, states = args[1 + n], args[2 + n:2 + 2 * n]
        w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse = args[2 + 2 * n:9 + 2 * n]
        option = args[9 + 2 * n] if self.cell != "lstm" else None
        return (args[:1 + n], x, states, w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse, option,
                self.variants(args[k:], kwargs or {}))

    def keywords(self, variants):
        """The variant arguments as functional's forwards take them (NumPy arrays, None
        where absent): w_hr, peep, zoneout, recurrent_dropout, layer_norm."""
        v = dict(zip(self.names, (_np(a) if isinstance(a, torch.Tensor) else a
                                  for a in variants)))
        masks = (v["zoneout_h"], v["zoneout_c"]) if self.cell == "lstm" else (v["zoneout_h"],)
        zoneout = v["zoneout_p"] or None
        if any(m is not None for m in masks):
            if zoneout is not None:
                raise ValueError("zoneout_p must be 0 where zoneout's masks are given")
            zoneout = masks if self.cell == "lstm" else masks[0]
        ln = [v[k] for k in F._LN_NAMES.get(self.cell, ())]
        return dict(w_hr=v.get("w_hr"), peep=v.get("peepholes"), zoneout=zoneout,
                    recurrent_dropout=v["recurrent_dropout"],
                    layer_norm=None if all(g is None for g in ln) else tuple(ln))

    # ------------------------------------------------ the operators' bodies

    def run_forward(self, x, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, option, train,
                    variants):
        """The kernels' forward: y, finals, and ws (a tensor; with train=False empty, else
        the workspace)."""
        cell, kw = self.cell, self.keywords(variants)
        w_hr = kw.pop("w_hr")
        x_, w_ih_, w_hh_, b_ih_, b_hh_, lengths_ = (_np(x), _np(w_ih), _np(w_hh), _np(b_ih),
                                                    _np(b_hh), _lengths_np(lengths))
        states_ = [_np(s) for s in states]
        ws = []

        def workspace(size, dtype):
            w = _pooled_empty(size, x)
            self.zero_unwritten(w, size, x, w_hh, lengths, w_hr is not None
                                or kw["layer_norm"] is not None)
            ws.append(w)
            return w.numpy()

        if w_hr is not None:  # the LSTM with a projection: functional's own path
            y, *finals, _ = F._lstmp_forward(x_, *states_, w_ih_, w_hh_, w_hr, b_ih_, b_hh_,
                                             lengths_, reverse, train, **kw,
                                             workspace=workspace if train else None)
        else:
            arrays = (x_, states_, w_ih_, w_hh_, b_ih_, b_hh_, lengths_, reverse,
                      _kernel_option(cell, option))
            y, finals = (F._checked_forward(cell, *arrays, True, workspace, **kw)[:2] if train
                         else F._forward(cell, *arrays, False, **kw)[:2])
        return y, finals, ws[0] if train else x.new_empty(0)

    def zero_unwritten(self, w, size, x, w_hh, lengths, whole):
        """Zero what the kernels leave unwritten in the workspace w (an operator's outputs
        are a function of its inputs, not of memory's garbage): the summed bias without
        biases, the packed weights' padding, with lengths the steps' scratch of empty rows;
        whole: all of it (the layouts of layer norm and the projection)."""
        if lengths is not None or whole:
            w.zero_()
        else:
            w[:w_hh.shape[0]].zero_()  # G*H
            w[size - _pack_size(self.cell, x.shape[2], w_hh.shape[1]):].zero_()

    @_on_torch_threads
    def forward(self, *args, **kwargs):
        if torch.onnx.is_in_onnx_export():  # the exporter traces this call: translate it
            _register_onnx()
        y, finals, ws = self.run_forward(*self.split(args, kwargs))
        return (torch.from_numpy(y), *(torch.from_numpy(f) for f in finals), ws)

    def widths(self, w_hh, variants):
        """H, and P: the projection's width (0 without one)."""
        w_hr = variants[0] if self.cell == "lstm" else None
        return w_hh.shape[0] // self.G, 0 if w_hr is None else w_hr.shape[0]

    def forward_fake(self, *args, **kwargs):
        x, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, option, train, variants = \
            self.split(args, kwargs)
        _kernel_option(self.cell, option)  # checked while tracing too
        T, B, I = x.shape
        H, P = self.widths(w_hh, variants)
        if not train:
            ws = x.new_empty(0)
        elif lengths is None:
            ln = any(variants[self.names.index(g)] is not None
                     for g in F._LN_NAMES.get(self.cell, ()))
            ws = x.new_empty(_workspace_size(self.cell, T, B, I, H, reverse, ln, P))
        else:  # the rows that take part, and so the size, depend on the lengths' values
            ws = x.new_empty(torch.library.get_ctx().new_dynamic_size())
        return (x.new_empty(T, B, P or H), x.new_empty(B, P or H),
                *(x.new_empty(B, H) for _ in range(self.n - 1)), ws)

    @_on_torch_threads
    def backward(self, *args, **kwargs):
        douts, x, states, w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse, option, variants = \
            self.split_backward(args, kwargs)
        ctx = self.backward_context(x, w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse, option,
                                    self.keywords(variants))
        dy, dfinals = _np(douts[0]), [_np(d) for d in douts[1:]]
        copy = _pooled_empty(ws.numel(), x)
        if ctx.layer_norm is None and ctx.w_hr is None:
            ctx.ws = ws.detach().numpy()  # what the kernels write: copy; ws stays as it was
            grads = F._backward(self.cell, dy, dfinals, ctx, keep_spare=False,
                                out=copy.numpy())
        else:  # these backwards work in place: on a copy of ws
            ctx.ws = copy.copy_(ws).numpy()
            grads = F._backward(self.cell, dy, dfinals, ctx, keep_spare=False)
        base, extra = list(grads[:5 + self.n]), list(grads[5 + self.n:])
        # functional's variant gradients, those given in _PARAMETERS' order
        base += [extra.pop(0) if v is not None else None
                 for v in variants[:len(self.parameters)]]
        return tuple(x.new_empty(0) if g is None else torch.from_numpy(g) for g in base)

    def backward_context(self, x, w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse, option, kw):
        """functional's ctx for a backward over ws (its saved state set later), after
        checking the forward's arguments and ws against each other, each by its name."""
        xn = F._check_x(_np(x))
        dtype, (T, B, I) = F._dtype_of(xn), xn.shape
        ctx = F.Context()
        if kw["w_hr"] is None:
            H, w_ih, w_hh, b_ih, b_hh = F._check_weights(self.cell, dtype, _np(w_ih),
                                                          _np(w_hh), _np(b_ih), _np(b_hh),
                                                          xn.shape)
            P = 0
        else:
            F._check_projection_variants(kw["zoneout"], kw["recurrent_dropout"],
                                         kw["layer_norm"])
            H, P, w_ih, w_hh, ctx.w_hr = F._check_projection(dtype, xn.shape, _np(w_ih),
                                                             _np(w_hh), kw["w_hr"])
            b_ih, b_hh = (F._check(n, _np(b), (4 * H,), dtype, optional=True)
                          for n, b in (("b_ih", b_ih), ("b_hh", b_hh)))
        ctx.cell, ctx.dtype, ctx.x, ctx.w_ih, ctx.w_hh = self.cell, dtype, xn, w_ih, w_hh
        ctx.plan = F._plan(_lengths_np(lengths), T, B, bool(reverse))
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        ctx.option = _kernel_option(self.cell, option)
        ctx.input_size, ctx.hidden_size = I, H
        ctx.peep = F._check("peepholes", kw["peep"], (3 * H,), dtype, optional=True)
        ctx.zoneout = F._check_zoneout(self.cell, kw["zoneout"], (T, B, H), dtype)
        ctx.recurrent_dropout = F._check_recurrent_dropout(kw["recurrent_dropout"], (B, H),
                                                           dtype)
        ctx.layer_norm = F._check_layer_norm(self.cell, ctx.option, kw["layer_norm"], H,
                                             dtype, ctx.peep is not None)
        size = _kernel_workspace_size(self.cell, ctx.plan, I, H, ctx.layer_norm is not None,
                                      P)
        if ws.numel() == 0:
            raise ValueError("ws is empty: the forward ran with train=False")
        if ws.dtype != x.dtype or ws.dim() != 1 or ws.numel() != size \
                or not ws.is_contiguous():
            raise ValueError(f"ws must be the forward's workspace: 1-D, contiguous, {size} "
                             f"elements of {x.dtype}, got {ws.dtype} {tuple(ws.shape)}")
        return ctx

    def backward_fake(self, *args, **kwargs):
        douts, x, states, w_ih, w_hh, b_ih, b_hh, ws, lengths, reverse, option, variants = \
            self.split_backward(args, kwargs)
        T, B, I = x.shape
        H, P = self.widths(w_hh, variants)
        GH = w_hh.shape[0]
        return (x.new_empty(T, B, I), x.new_empty(B, P or H),
                *(x.new_empty(B, H) for _ in range(self.n - 1)),
                x.new_empty(GH, I), x.new_empty(GH, w_hh.shape[1]),
                x.new_empty(0 if b_ih is None else GH),
                x.new_empty(0 if b_hh is None else GH),
                *(x.new_empty(0) if v is None else x.new_empty(v.shape)
                  for v in variants[:len(self.parameters)]))

    # ------------------------------------------------ autograd

    def save(self, ctx, inputs, output):
        x, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, option, train, variants = \
            self.split(inputs)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(output[-1])
        ctx.save_for_backward(*inputs[:6 + self.n], *variants[:-1], output[-1])  # tensors, ws
        ctx.reverse, ctx.option, ctx.train, ctx.zoneout_p = reverse, option, train, variants[-1]

    def gradient(self, ctx, *grads):
        """The forwards' gradient."""
        n = self.n
        *saved, ws = ctx.saved_tensors
        x, states, (w_ih, w_hh, b_ih, b_hh, lengths) = saved[0], saved[1:1 + n], \
            saved[1 + n:6 + n]
        variants = (*saved[6 + n:], ctx.zoneout_p)
        opt = _option(self.cell, ctx.option)
        if torch.is_grad_enabled() and not _recording() or _nested_derivative():
            raise RuntimeError(_FIRST_ORDER)
        with torch.no_grad():  # torch.func's grad runs backward with create_graph=True
            if not ctx.train:  # the forward kept nothing (it ran without autograd): replay
                ws = self.fwd(x, *states, w_ih, w_hh, b_ih, b_hh, lengths, ctx.reverse, *opt,
                              True, *variants)[-1]
            out = self.bwd(*grads[:1 + n], x, *states, w_ih, w_hh, b_ih, b_hh, ws, lengths,
                           ctx.reverse, *opt, *variants)
        dx, dstates, (dw_ih, dw_hh, db_ih, db_hh) = out[0], out[1:1 + n], out[1 + n:5 + n]
        dvariants = [d if v is not None else None for d, v in zip(out[5 + n:], variants)]
        return (dx, *(d if s is not None else None for d, s in zip(dstates, states)),
                dw_ih, dw_hh, db_ih if b_ih is not None else None,
                db_hh if b_hh is not None else None, None, None, *(None,) * len(opt), None,
                *dvariants, *(None,) * (len(self.names) - len(dvariants)))

    def vmap(self, apply, info, in_dims, *args):
        """A batching rule: examples that share the weights (the variants' too) are one
        call (``apply``) over a batch of N*B rows; examples with weights of their own, or
        with masks (a row's), one call each."""
        N = info.batch_size
        x, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, option, train, variants = \
            self.split(args)
        dims = self.split(in_dims)
        k = len(self.parameters)
        if (any(d is not None for d in (*dims[2:6], *dims[-1][:k]))
                or any(m is not None for m in variants[k:-1])):
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
        douts, x, states, w_ih, w_hh, b_ih, b_hh, _, lengths, reverse, option, variants = \
            self.split_backward(args)
        tensors = (x, *states, w_ih, w_hh, b_ih, b_hh)
        rest = (lengths, reverse, *_option(self.cell, option))
        ws = self.fwd(*tensors, *rest, True, *variants)[-1]
        return self.bwd(*douts, *tensors, ws, *rest, *variants)

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
    sizes = [_kernel_workspace_size(cell, F._full_plan(T, B, False), I, H, ln, P)
             for cell, ln, P in (("lstm", False, 0), ("gru", False, 0), ("rnn", False, 0),
                                 ("lstm", True, 0), ("gru", True, 0), ("lstm", False, 2))
             for T, B, I, H in ((1, 1, 1, 3), (3, 2, 5, 7))]
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
