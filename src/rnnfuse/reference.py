"""Pure-NumPy reference of the rnnfuse kernel contract (see docs/design.md).

The same six functions as ``rnnfuse.functional``::

    y, h_n, c_n, ctx = lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False)
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh = lstm_backward(dy, dh_n, dc_n, ctx)
    y, h_n, ctx = gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False,
                              linear_before_reset=True)
    dx, dh0, dw_ih, dw_hh, db_ih, db_hh = gru_backward(dy, dh_n, ctx)
    y, h_n, ctx = rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False,
                              nonlinearity="tanh")
    dx, dh0, dw_ih, dw_hh, db_ih, db_hh = rnn_backward(dy, dh_n, ctx)

Notation: T steps, B batch, I input size, H hidden size, G gates (LSTM 4, GRU 3, RNN 1).
Time-major ``x (T, B, I)``, ``y (T, B, H)``, states ``(B, H)``; PyTorch weight layout
``w_ih (G*H, I)``, ``w_hh (G*H, H)``, ``b_ih``, ``b_hh (G*H,)``. Every forward also takes
``need_ctx=True`` (keyword only); ``need_ctx=False`` saves nothing and returns ``ctx=None``.
The variants, keyword only, as in ``rnnfuse.functional``: ``zoneout`` (every cell), the
LSTM's ``peepholes`` and projection ``w_hr``, and the LSTM's and GRU's ``layer_norm`` (in
``_layernorm_reference``).

This module is the oracle for the tests and the baseline for the benchmarks. It does NOT
validate its inputs (dtypes, shapes, lengths range): that is ``functional.py``'s job, and
bad input here gives NumPy's errors or wrong answers. It only checks that ``ctx`` comes
from the matching forward and is used once.

How it computes (the loop shape of the kernels, in NumPy):

1. Pack: order the batch by length (longest first) and lay the valid steps out as rows of
   a ``(N, .)`` array, N = sum(lengths), step t occupying ``B_t`` consecutive rows (the
   sequences still running at t), as PyTorch's packed sequences do. ``reverse=True`` packs
   each sequence from its last valid step back to its first. Padding is never computed.
2. Hoist the input projection: one GEMM ``(N, I) x (I, G*H)`` with the biases folded in
   (except GRU's recurrent n-bias when the reset gate multiplies it).
3. One GEMM per step for the recurrence (two for GRU with ``linear_before_reset=False``).
4. Backward runs the steps in reverse and overwrites the saved gates with their gradients;
   ``dW_ih``, ``dW_hh`` and ``dx`` are single GEMMs over all steps after the loop, and bias
   gradients are column sums.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._checks import check_nonlinearity
from ._typing import CellGrads, FloatArray, LSTMGrads

__all__ = [
    "lstm_forward",
    "lstm_backward",
    "gru_forward",
    "gru_backward",
    "rnn_forward",
    "rnn_backward",
]


# ----------------------------------------------------------------------------- helpers


def _sigmoid_(a: NDArray[Any]) -> NDArray[Any]:
    """In place: a <- 1 / (1 + exp(-a)). exp may overflow to inf, giving the exact limit 0."""
    # Not np.negative(a, out=a): NumPy 2.4.6's in-place float32 negative reads a strided
    # (n, 1) view as if it were contiguous (a wrong answer, no error).
    with np.errstate(over="ignore"):
        np.exp(-a, out=a)
    a += 1
    np.reciprocal(a, out=a)
    return a


class _Packing:
    """Maps time-major ``(T, B, k)`` arrays to packed ``(N, k)`` rows and back.

    Packed row ``offset[t] + j`` is step t of sorted sequence j (j < B_t); it reads time
    ``tsrc`` of batch entry ``bsrc``. States ``(B, H)`` are kept in sorted order during
    the loop, so the sequences running at step t are always the leading ``B_t`` rows.
    """

    def __init__(self, T: int, B: int, lengths: ArrayLike | None, reverse: bool) -> None:
        self.T, self.B = T, B
        if lengths is not None:
            lengths = np.asarray(lengths).astype(np.intp)
            if B == 0 or (not reverse and np.all(lengths == T)):
                lengths = None  # full length forward: the packed layout is x itself
        if lengths is None:
            self.mode = "reverse" if reverse else "identity"
            self.order = None
            steps_bt = [B] * T if B > 0 else []
        else:
            self.mode = "gather"
            # longest first; stable so equal lengths keep their batch order
            self.order = np.argsort(-lengths, kind="stable")
            ls = lengths[self.order]
            t_max = int(ls[0])
            running = ls[None, :] > np.arange(t_max)[:, None]  # (t_max, B): step t of seq j is valid
            steps_bt = running.sum(axis=1).tolist()
            tt, jj = np.nonzero(running)  # row-major: by step, then by sorted sequence
            self.bsrc = self.order[jj]
            self.tsrc = ls[jj] - 1 - tt if reverse else tt
        offsets = np.concatenate([[0], np.cumsum(steps_bt, dtype=np.intp)]).tolist()
        self.n = offsets[-1]
        # (rows of step t in the packed arrays, B_t)
        self.steps = [(slice(offsets[t], offsets[t + 1]), bt) for t, bt in enumerate(steps_bt)]

    def gather(self, a: NDArray[Any]) -> NDArray[Any]:
        """(T, B, k) -> (N, k) packed rows (a view when possible; never written to)."""
        if self.mode == "identity":
            return a.reshape(self.T * self.B, a.shape[2])
        if self.mode == "reverse":
            return a[::-1].reshape(self.T * self.B, a.shape[2])
        return a[self.tsrc, self.bsrc]

    def scatter(self, p: NDArray[Any]) -> NDArray[Any]:
        """(N, k) packed rows -> (T, B, k), zeros at padding."""
        k = p.shape[1]
        if self.mode == "identity":
            return p.reshape(self.T, self.B, k)
        if self.mode == "reverse":
            return np.ascontiguousarray(p.reshape(self.T, self.B, k)[::-1])
        out = np.zeros((self.T, self.B, k), dtype=p.dtype)
        out[self.tsrc, self.bsrc] = p
        return out

    def sort_state(self, s: ArrayLike | None, shape: tuple[int, int],
                   dtype: np.dtype[Any]) -> NDArray[Any]:
        """A fresh (B, H) state in sorted order (zeros for None); the caller's array is untouched."""
        if s is None:
            return np.zeros(shape, dtype=dtype)
        if self.order is None:
            return np.array(s, dtype=dtype, order="C")
        return np.asarray(s)[self.order].astype(dtype, copy=False)

    def unsort_state(self, s: NDArray[Any]) -> NDArray[Any]:
        if self.order is None:
            return s
        out = np.empty_like(s)
        out[self.order] = s
        return out


class _Context:
    """What backward needs, saved by forward. Opaque; usable by one backward call."""

    def __init__(self, cell: str, **saved: Any) -> None:
        self.cell = cell
        self.used = False
        self.saved: dict[str, Any] | None = saved

    def __repr__(self) -> str:
        state = "used" if self.used else "unused"
        return f"<rnnfuse.reference {self.cell} context ({state})>"


def _take_ctx(ctx: object, cell: str) -> dict[str, Any]:
    """Check that ctx is an unused context of `cell`, mark it used and return what it saved."""
    if ctx is None:
        raise ValueError(
            f"ctx is None: the forward was run with need_ctx=False, so {cell}_backward cannot run"
        )
    if not isinstance(ctx, _Context):
        raise TypeError(
            f"ctx must be the context returned by rnnfuse.reference.{cell}_forward, "
            f"got {type(ctx).__name__}"
        )
    if ctx.cell != cell:
        raise TypeError(
            f"ctx comes from {ctx.cell}_forward, but {cell}_backward needs the ctx of {cell}_forward"
        )
    if ctx.used or ctx.saved is None:
        raise ValueError(
            f"ctx was already used by a {cell}_backward call; backward can be called once per forward"
        )
    ctx.used = True
    saved, ctx.saved = ctx.saved, None  # free the saved arrays once backward is done
    return saved


def _setup(x: ArrayLike, w_ih: NDArray[Any], w_hh: NDArray[Any], lengths: ArrayLike | None,
           reverse: bool) -> tuple[NDArray[Any], np.dtype[Any], int, int, int, _Packing]:
    x = np.asarray(x)
    T, B, _ = x.shape
    H = w_hh.shape[1]
    pack = _Packing(T, B, lengths, reverse)
    return x, x.dtype, T, B, H, pack


def _folded_bias(b_ih: ArrayLike | None, b_hh: ArrayLike | None, G: int, H: int,
                 dtype: np.dtype[Any], skip_hh_block: int | None = None) -> NDArray[Any] | None:
    """b_ih + b_hh as one (G*H,) vector (None if both are absent); optionally leave out one
    gate block of b_hh (GRU's n-block when the reset gate multiplies it)."""
    if b_ih is None and b_hh is None:
        return None
    b = np.zeros(G * H, dtype=dtype)
    if b_ih is not None:
        b += b_ih
    if b_hh is not None:
        if skip_hh_block is None:
            b += b_hh
        else:
            keep = np.ones(G * H, dtype=bool)
            keep[skip_hh_block * H:(skip_hh_block + 1) * H] = False
            b[keep] += np.asarray(b_hh)[keep]
    return b


def _input_projection(X: NDArray[Any], w_ih: NDArray[Any],
                      bias: NDArray[Any] | None) -> NDArray[Any]:
    # XP = X W_ih^T + bias, for all valid steps at once: (N, I) x (I, G*H)
    XP = X @ w_ih.T
    if bias is not None:
        XP += bias
    return XP


def _grad_setup(pack: _Packing, dy: ArrayLike | None, dh_n: ArrayLike | None, B: int, H: int,
                dtype: np.dtype[Any]) -> tuple[NDArray[Any] | None, NDArray[Any]]:
    DY = None if dy is None else pack.gather(np.asarray(dy, dtype=dtype))
    dh = pack.sort_state(dh_n, (B, H), dtype)
    return DY, dh


def _zoneout_weights(pack: _Packing, zoneout: Any, lstm: bool,
                     dtype: np.dtype[Any]) -> tuple[Any, Any]:
    """The weights with which h and (LSTM) c keep their previous values: each None, a
    scalar p (eval's zoneout), or packed (N, H) rows of the given (T, B, H) masks."""
    if zoneout is None:
        return None, None
    if np.ndim(zoneout) == 0 and not isinstance(zoneout, (tuple, list)):
        p = dtype.type(zoneout)
        return p, (p if lstm else None)
    z_h, z_c = zoneout if lstm else (zoneout, None)
    rows = lambda z: None if z is None else pack.gather(np.asarray(z, dtype=dtype))  # noqa: E731
    return rows(z_h), rows(z_c)


def _recdrop_rows(pack: _Packing, mask: ArrayLike | None,
                  dtype: np.dtype[Any]) -> NDArray[Any] | None:
    """Recurrent dropout's (B, H) mask in the sorted row order of the states, or None."""
    return None if mask is None else pack.sort_state(np.asarray(mask, dtype=dtype),
                                                     np.shape(mask), dtype)


def _masked(hp: NDArray[Any], M: NDArray[Any] | None) -> NDArray[Any]:
    """h_{t-1} as the recurrent product takes it: times the mask's running rows."""
    return hp if M is None else hp * M[:hp.shape[0]]


def _at(k: Any, sl: slice) -> Any:
    """A step's zoneout weights (scalar weights serve every step)."""
    return k if np.ndim(k) == 0 else k[sl]


def _zone(k: Any, old: Any, new: NDArray[Any]) -> NDArray[Any]:
    """Zoneout: each unit keeps its previous value with weight k."""
    return k * old + (1 - k) * new


def _bias_grads(db: NDArray[Any], has_b_ih: bool,
                has_b_hh: bool) -> tuple[NDArray[Any] | None, NDArray[Any] | None]:
    return (db if has_b_ih else None), (db.copy() if has_b_hh else None)


# ------------------------------------------------------------------------------- LSTM


def lstm_forward(x: ArrayLike, h0: ArrayLike | None, c0: ArrayLike | None, w_ih: FloatArray,
                 w_hh: FloatArray, b_ih: ArrayLike | None, b_hh: ArrayLike | None,
                 lengths: ArrayLike | None = None, reverse: bool = False, *, need_ctx: bool = True,
                 peepholes: ArrayLike | None = None, zoneout: Any = None,
                 recurrent_dropout: ArrayLike | None = None, layer_norm: Any = None,
                 w_hr: ArrayLike | None = None,
                 ) -> tuple[FloatArray, FloatArray, FloatArray, _Context | None]:
    """LSTM over a (T, B, I) sequence. Returns y (T, B, H), h_n, c_n (B, H) and ctx.

    Gates i, f, g, o: i,f,o = sigmoid, g = tanh of (W_i* x + b_i* + W_h* h + b_h*);
    c' = f*c + i*g; h' = o*tanh(c').
    peepholes: None, or P (3H,) in ONNX's order i, o, f: i and f add P_i*c and P_f*c to
    their pre-activations, o adds P_o*c'. lstm_backward then also returns dP (last).
    zoneout: None, p (every unit keeps p of its previous h and c), or a pair (z_h, z_c) of
    (T, B, H) weights or None: h_t = z_h h_{t-1} + (1 - z_h) h~_t, c likewise; y_t = h_t.
    recurrent_dropout: None, or a (B, H) mask m: the recurrent product takes h_{t-1} m.
    layer_norm: None, or (g_ih, g_hh, g_c, b_c) (or a dict of those keys): the
    layer-normalized LSTM, as rnnfuse.functional's; backward then returns their gradients
    after the seven.
    w_hr: None, or a projection (R, H), R < H: h' = W_hr (o*tanh(c')), so h0, h_n, y and
    the state are R wide and w_hh is (4H, R); lstm_backward then also returns dw_hr
    (before dP).
    """
    if layer_norm is not None:
        from . import _layernorm_reference as LN
        return LN.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                               need_ctx, layer_norm, zoneout, recurrent_dropout)
    x, dtype, T, B, _, pack = _setup(x, w_ih, w_hh, lengths, reverse)
    H = w_ih.shape[0] // 4
    Wr = None if w_hr is None else np.asarray(w_hr, dtype=dtype)
    R = H if Wr is None else Wr.shape[0]  # the width of h
    P = None if peepholes is None else np.asarray(peepholes, dtype=dtype)
    Kh, Kc = _zoneout_weights(pack, zoneout, True, dtype)
    M = _recdrop_rows(pack, recurrent_dropout, dtype)
    X = pack.gather(x)
    # 1. a = x W_ih^T + b_ih + b_hh for every valid step; becomes the gate activations in place
    A = _input_projection(X, w_ih, _folded_bias(b_ih, b_hh, 4, H, dtype))
    h = pack.sort_state(h0, (B, R), dtype)
    c = pack.sort_state(c0, (B, H), dtype)
    Y = np.empty((pack.n, R), dtype=dtype)
    Mt = np.empty((pack.n, H), dtype=dtype) if need_ctx and Wr is not None else None  # m_t
    if need_ctx:
        Hprev = np.empty((pack.n, R), dtype=dtype)  # h_{t-1} (masked), for dW_hh
        Cprev = np.empty((pack.n, H), dtype=dtype)  # c_{t-1}, for df
        TC = np.empty((pack.n, H), dtype=dtype)  # tanh(c_t), for do and dc
    CT = np.empty((pack.n, H), dtype=dtype) if need_ctx and P is not None else None  # c_t
    w_hh_t = w_hh.T
    for sl, bt in pack.steps:
        hp, cp = h[:bt], c[:bt]
        zoned = Kh is not None or Kc is not None
        h_old, c_old = (hp.copy(), cp.copy()) if zoned else (None, None)
        hm = _masked(hp, M)
        if need_ctx:
            Hprev[sl] = hm
            Cprev[sl] = cp
        a = A[sl]
        # 2. a += h_{t-1} W_hh^T, then the gate nonlinearities in place
        a += hm @ w_hh_t
        i, f, g, o = a[:, :H], a[:, H: 2 * H], a[:, 2 * H: 3 * H], a[:, 3 * H:]
        if P is not None:  # i and f peep at c_{t-1}
            i += P[:H] * cp
            f += P[2 * H:] * cp
        _sigmoid_(a[:, : 2 * H])  # i, f
        np.tanh(g, out=g)
        # 3. c_t = f c_{t-1} + i g ;  h_t = o tanh(c_t)   (h, c updated in place)
        cp *= f
        cp += i * g
        if P is not None:  # o peeps at c_t
            o += P[H: 2 * H] * cp
            if CT is not None:  # for dP_o
                CT[sl] = cp
        _sigmoid_(o)
        tc = np.tanh(cp)
        if Wr is None:
            np.multiply(o, tc, out=hp)
        else:  # h_t = W_hr m_t
            m = o * tc
            hp[...] = m @ Wr.T
            if Mt is not None:
                Mt[sl] = m
        if Kc is not None:
            cp[...] = _zone(_at(Kc, sl), c_old, cp)
        if Kh is not None:
            hp[...] = _zone(_at(Kh, sl), h_old, hp)
        Y[sl] = hp
        if need_ctx:
            TC[sl] = tc
    y = pack.scatter(Y)
    h_n, c_n = pack.unsort_state(h), pack.unsort_state(c)
    ctx = None
    if need_ctx:
        ctx = _Context(
            "lstm", pack=pack, X=X, gates=A, Hprev=Hprev, Cprev=Cprev, TC=TC, w_ih=w_ih, w_hh=w_hh,
            has_b_ih=b_ih is not None, has_b_hh=b_hh is not None, dtype=dtype, H=H, P=P, CT=CT,
            Kh=Kh, Kc=Kc, M=M, Wr=Wr, Mt=Mt,
        )
    return y, h_n, c_n, ctx


def lstm_backward(dy: ArrayLike | None, dh_n: ArrayLike | None, dc_n: ArrayLike | None,
                  ctx: _Context) -> LSTMGrads:
    """Gradients of lstm_forward. Returns dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh
    (a bias gradient is None where that bias was None), then dw_hr where the forward had
    w_hr, then dP where it had peepholes."""
    s = _take_ctx(ctx, "lstm")
    if "ln" in s:
        from . import _layernorm_reference as LN
        ln_grads: Any = LN.lstm_backward(dy, dh_n, dc_n, s)
        return ln_grads
    pack, dtype, H = s["pack"], s["dtype"], s["H"]
    B = pack.B
    G, TC, Cprev = s["gates"], s["TC"], s["Cprev"]
    w_hh, P, Kh, Kc, M = s["w_hh"], s["P"], s["Kh"], s["Kc"], s["M"]
    Wr = s["Wr"]
    DY, dh = _grad_setup(pack, dy, dh_n, B, H if Wr is None else Wr.shape[0], dtype)
    DH = np.empty((pack.n, 0 if Wr is None else Wr.shape[0]), dtype=dtype)  # dh_t (Wr)
    dc = pack.sort_state(dc_n, (B, H), dtype)
    for sl, bt in reversed(pack.steps):
        dht, dct = dh[:bt], dc[:bt]
        if DY is not None:
            dht += DY[sl]  # y_t = h_t
        # zoneout: h_t = k h_{t-1} + (1-k) h~_t; the k part waits for dh_{t-1} (c likewise)
        if Kh is not None:
            carry_h = _at(Kh, sl) * dht
            dht *= 1 - _at(Kh, sl)
        if Kc is not None:
            carry_c = _at(Kc, sl) * dct
            dct *= 1 - _at(Kc, sl)
        g4 = G[sl]
        i, f, g, o = g4[:, :H], g4[:, H: 2 * H], g4[:, 2 * H: 3 * H], g4[:, 3 * H:]
        tc = TC[sl]
        dmt = dht  # the gradient of m_t = o tanh(c_t): with a projection, dh_t W_hr
        if Wr is not None:
            DH[sl] = dht
            dmt = dht @ Wr
        # m_t = o tanh(c_t):  d(a_o) = dm tanh(c_t) o (1-o);  dc_t += dm o (1 - tanh^2 c_t)
        da_o = dmt * tc
        da_o *= o * (1 - o)
        dct += dmt * o * (1 - tc * tc)
        if P is not None:  # o's peephole
            dct += da_o * P[H: 2 * H]
        # c_t = f c_{t-1} + i g
        da_i = dct * g * i * (1 - i)
        da_f = dct * Cprev[sl] * f * (1 - f)
        da_g = dct * i * (1 - g * g)
        dct *= f  # dc_{t-1}
        if P is not None:  # i's and f's peepholes
            dct += da_i * P[:H] + da_f * P[2 * H:]
        if Kc is not None:
            dct += carry_c
        # the saved gates become the pre-activation gradients
        i[...] = da_i
        f[...] = da_f
        g[...] = da_g
        o[...] = da_o
        # dh_{t-1} = da W_hh (times recurrent dropout's mask)
        np.matmul(g4, w_hh, out=dht)
        if M is not None:
            dht *= M[:bt]
        if Kh is not None:
            dht += carry_h
    dh0, dc0 = pack.unsort_state(dh), pack.unsort_state(dc)
    # after the loop, one GEMM each over all N packed steps
    dw_ih = G.T @ s["X"]  # dW_ih = da^T x
    dw_hh = G.T @ s["Hprev"]  # dW_hh = da^T h_{t-1} (masked)
    dx = pack.scatter(G @ s["w_ih"])  # dx = da W_ih
    db_ih, db_hh = _bias_grads(G.sum(axis=0), s["has_b_ih"], s["has_b_hh"])
    grads: Any = (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh)
    if Wr is not None:  # dW_hr = sum over steps of dh_t^T m_t
        grads += (DH.T @ s["Mt"],)
    if P is not None:  # dP = sum over steps of da_i c_{t-1}, da_o c_t, da_f c_{t-1}
        dP = np.concatenate([(G[:, :H] * Cprev).sum(axis=0), (G[:, 3 * H:] * s["CT"]).sum(axis=0),
                             (G[:, H: 2 * H] * Cprev).sum(axis=0)])
        grads += (dP,)
    return grads  # (the elements after the seventh are beyond LSTMGrads, the plain call's)


# -------------------------------------------------------------------------------- GRU


def gru_forward(x: ArrayLike, h0: ArrayLike | None, w_ih: FloatArray, w_hh: FloatArray,
                b_ih: ArrayLike | None, b_hh: ArrayLike | None,
                lengths: ArrayLike | None = None, reverse: bool = False,
                linear_before_reset: bool = True, *, need_ctx: bool = True,
                zoneout: Any = None,
                recurrent_dropout: ArrayLike | None = None, layer_norm: Any = None,
                ) -> tuple[FloatArray, FloatArray, _Context | None]:
    """GRU over a (T, B, I) sequence. Returns y (T, B, H), h_n (B, H) and ctx.

    Gates r, z, n: r,z = sigmoid(W_i* x + b_i* + W_h* h + b_h*);
    linear_before_reset=True:  n = tanh(W_in x + b_in + r*(W_hn h + b_hn));
    linear_before_reset=False: n = tanh(W_in x + b_in + W_hn (r*h) + b_hn);
    h' = (1-z)*n + z*h.
    zoneout: None, p, or (T, B, H) weights: h_t = k h_{t-1} + (1-k) h'; y_t = h_t.
    recurrent_dropout: None, or a (B, H) mask m: the recurrent products take h_{t-1} m
    (without lbr, r (h_{t-1} m)); z h_{t-1} is not masked.
    layer_norm: None, or (g_ih, g_hh) (or a dict of those keys), with lbr: the
    layer-normalized GRU, as rnnfuse.functional's; backward then returns dg_ih, dg_hh
    after the six.
    """
    if layer_norm is not None:
        from . import _layernorm_reference as LN
        return LN.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, need_ctx,
                              layer_norm, zoneout, recurrent_dropout)
    x, dtype, T, B, H, pack = _setup(x, w_ih, w_hh, lengths, reverse)
    lbr = bool(linear_before_reset)
    Kh = _zoneout_weights(pack, zoneout, False, dtype)[0]
    M = _recdrop_rows(pack, recurrent_dropout, dtype)
    X = pack.gather(x)
    # 1. a = x W_ih^T + biases; with lbr the reset gate multiplies b_hn, so it stays out
    A = _input_projection(X, w_ih, _folded_bias(b_ih, b_hh, 3, H, dtype, skip_hh_block=2 if lbr else None))
    b_hn = None if (b_hh is None or not lbr) else np.asarray(b_hh)[2 * H:]
    h = pack.sort_state(h0, (B, H), dtype)
    Y = np.empty((pack.n, H), dtype=dtype)
    if need_ctx:
        Hprev = np.empty((pack.n, H), dtype=dtype)
        Hm = np.empty((pack.n, H), dtype=dtype) if M is not None else Hprev  # masked
        # lbr: hn = W_hn h_{t-1} + b_hn (for dr);  not lbr: r*h_{t-1} (for dW_hn)
        Aux = np.empty((pack.n, H), dtype=dtype)
    w_hh_t = w_hh.T
    w_hrz_t, w_hn_t = w_hh[: 2 * H].T, w_hh[2 * H:].T
    for sl, bt in pack.steps:
        hp = h[:bt]
        h_old = hp.copy() if Kh is not None else None
        hm = _masked(hp, M)
        if need_ctx:
            Hprev[sl] = hp
            if M is not None:
                Hm[sl] = hm
        aux = _gru_step(A[sl], hp, hm, lbr, w_hh_t, w_hrz_t, w_hn_t, b_hn)
        if need_ctx:
            Aux[sl] = aux
        if Kh is not None:
            hp[...] = _zone(_at(Kh, sl), h_old, hp)
        Y[sl] = hp
    y = pack.scatter(Y)
    h_n = pack.unsort_state(h)
    ctx = None
    if need_ctx:
        ctx = _Context(
            "gru", pack=pack, X=X, gates=A, Hprev=Hprev, Aux=Aux, w_ih=w_ih, w_hh=w_hh, lbr=lbr,
            has_b_ih=b_ih is not None, has_b_hh=b_hh is not None, dtype=dtype, H=H, Kh=Kh,
            M=M, Hm=Hm,
        )
    return y, h_n, ctx


def _gru_step(a: NDArray[Any], hp: NDArray[Any], hm: NDArray[Any], lbr: bool,
              w_hh_t: NDArray[Any],
              w_hrz_t: NDArray[Any], w_hn_t: NDArray[Any],
              b_hn: NDArray[Any] | None) -> NDArray[Any]:
    """One GRU step of the B_t running rows, in place: the input projection ``a (B_t, 3H)``
    becomes the gates r, z, n and ``hp (B_t, H)`` goes from h_{t-1} to h_t; ``hm`` is the
    h_{t-1} the recurrent products take (recurrent dropout's, or hp itself). Returns what
    backward needs besides: hn = W_hn h_{t-1} + b_hn (lbr) or r*h_{t-1} (not lbr)."""
    H = hp.shape[1]
    arz, an = a[:, : 2 * H], a[:, 2 * H:]
    if lbr:
        # 2. hh = h_{t-1} W_hh^T (+ b_hn on the n block): one GEMM for all three gates
        hh = hm @ w_hh_t
        hn = hh[:, 2 * H:]
        if b_hn is not None:
            hn += b_hn
        arz += hh[:, : 2 * H]
        _sigmoid_(arz)
        r = a[:, :H]
        an += r * hn  # n = tanh(a_n + r * hn)
        aux = hn
    else:
        # 2. r, z first, then n from r*h_{t-1}: two GEMMs
        arz += hm @ w_hrz_t
        _sigmoid_(arz)
        rh = a[:, :H] * hm
        an += rh @ w_hn_t  # n = tanh(a_n + (r h) W_hn^T)
        aux = rh
    np.tanh(an, out=an)
    z, n = a[:, H: 2 * H], an
    # 3. h_t = (1-z) n + z h_{t-1} = n + z (h_{t-1} - n), in place
    hp -= n
    hp *= z
    hp += n
    return aux


def gru_backward(dy: ArrayLike | None, dh_n: ArrayLike | None, ctx: _Context) -> CellGrads:
    """Gradients of gru_forward. Returns dx, dh0, dw_ih, dw_hh, db_ih, db_hh
    (a bias gradient is None where that bias was None)."""
    s = _take_ctx(ctx, "gru")
    if "ln" in s:
        from . import _layernorm_reference as LN
        ln_grads: Any = LN.gru_backward(dy, dh_n, s)
        return ln_grads
    pack, dtype, H, lbr = s["pack"], s["dtype"], s["H"], s["lbr"]
    G, Hprev, Aux, w_hh, Kh = s["gates"], s["Hprev"], s["Aux"], s["w_hh"], s["Kh"]
    M, Hm = s["M"], s["Hm"]
    DY, dh = _grad_setup(pack, dy, dh_n, pack.B, H, dtype)
    w_hrz, w_hn = w_hh[: 2 * H], w_hh[2 * H:]
    for sl, bt in reversed(pack.steps):
        dht = dh[:bt]
        if DY is not None:
            dht += DY[sl]
        if Kh is not None:  # zoneout: the k part waits for dh_{t-1}
            carry = _at(Kh, sl) * dht
            dht *= 1 - _at(Kh, sl)
        g3 = G[sl]
        r, z, n = g3[:, :H], g3[:, H: 2 * H], g3[:, 2 * H:]
        hp = Hprev[sl]
        # h_t = (1-z) n + z h_{t-1}
        da_n = dht * (1 - z)
        da_n *= 1 - n * n  # through n = tanh(a_n)
        da_z = dht * (hp - n)
        da_z *= z * (1 - z)
        dprev = dht * z
        if lbr:
            # a_n = ... + r hn,  hn = W_hn h_{t-1} + b_hn
            hn = Aux[sl]
            da_r = da_n * hn * r * (1 - r)
            dhn = da_n * r
            # gates <- d(hh) = [da_r, da_z, da_n r] (gradient of h_{t-1} W_hh^T + b_hh);
            # Aux <- da_n (the input side's n gradient)
            Aux[sl] = da_n
            r[...] = da_r
            z[...] = da_z
            n[...] = dhn
            np.matmul(g3, w_hh, out=dht)
        else:
            # a_n = ... + (r hm) W_hn^T, hm = h_{t-1} (times the mask)
            drh = da_n @ w_hn
            da_r = drh * Hm[sl] * r * (1 - r)
            drh *= r  # the gradient of hm through r hm
            r[...] = da_r
            z[...] = da_z
            n[...] = da_n
            np.matmul(g3[:, : 2 * H], w_hrz, out=dht)
            if M is None:
                dprev += drh
            else:
                dht += drh
        if M is not None:  # the products took h_{t-1} m
            dht *= M[:bt]
        dht += dprev  # dh_{t-1} = dh_t z + (gate gradients) W_hh
        if Kh is not None:
            dht += carry
    dh0 = pack.unsort_state(dh)
    if lbr:
        dw_hh = G.T @ Hm  # dW_hh = d(hh)^T h_{t-1} (masked)
        db_hh = G.sum(axis=0)
        G[:, 2 * H:] = Aux  # now G holds d(a) for the input side
        db_ih = G.sum(axis=0)
    else:
        dw_hh = np.empty_like(w_hh, dtype=dtype)
        dw_hh[: 2 * H] = G[:, : 2 * H].T @ Hm  # dW_hr,hz = da_rz^T h_{t-1} (masked)
        dw_hh[2 * H:] = G[:, 2 * H:].T @ Aux  # dW_hn = da_n^T (r h_{t-1})
        db_ih = G.sum(axis=0)
        db_hh = db_ih.copy()
    dw_ih = G.T @ s["X"]
    dx = pack.scatter(G @ s["w_ih"])
    return (dx, dh0, dw_ih, dw_hh,
            db_ih if s["has_b_ih"] else None, db_hh if s["has_b_hh"] else None)


# -------------------------------------------------------------------------------- RNN


def rnn_forward(x: ArrayLike, h0: ArrayLike | None, w_ih: FloatArray, w_hh: FloatArray,
                b_ih: ArrayLike | None, b_hh: ArrayLike | None,
                lengths: ArrayLike | None = None, reverse: bool = False,
                nonlinearity: Literal["tanh", "relu"] = "tanh", *, need_ctx: bool = True,
                zoneout: Any = None,
                recurrent_dropout: ArrayLike | None = None,
                ) -> tuple[FloatArray, FloatArray, _Context | None]:
    """Elman RNN over a (T, B, I) sequence: h' = act(W_ih x + b_ih + W_hh h + b_hh), act "tanh"
    or "relu". Returns y (T, B, H), h_n (B, H) and ctx. zoneout, recurrent_dropout: as
    gru_forward's."""
    check_nonlinearity(nonlinearity)
    x, dtype, T, B, H, pack = _setup(x, w_ih, w_hh, lengths, reverse)
    X = pack.gather(x)
    Kh = _zoneout_weights(pack, zoneout, False, dtype)[0]
    M = _recdrop_rows(pack, recurrent_dropout, dtype)
    # 1. a = x W_ih^T + b_ih + b_hh; after the loop A holds h'_t for every valid step
    A = _input_projection(X, w_ih, _folded_bias(b_ih, b_hh, 1, H, dtype))
    h = pack.sort_state(h0, (B, H), dtype)
    # with zoneout y is h_t, after it, while A keeps h'_t for backward
    Y = A if Kh is None else np.empty((pack.n, H), dtype=dtype)
    if need_ctx:
        Hprev = np.empty((pack.n, H), dtype=dtype)
    w_hh_t = w_hh.T
    for sl, bt in pack.steps:
        hp = h[:bt]
        hm = _masked(hp, M)
        if need_ctx:
            Hprev[sl] = hm  # for dW_hh
        a = A[sl]
        # 2. h_t = act(a + h_{t-1} W_hh^T)
        a += hm @ w_hh_t
        if nonlinearity == "tanh":
            np.tanh(a, out=a)
        else:
            np.maximum(a, 0, out=a)  # NaN propagates
        if Kh is None:
            hp[...] = a
        else:
            hp[...] = _zone(_at(Kh, sl), hp, a)
            Y[sl] = hp
    y = pack.scatter(Y)
    h_n = pack.unsort_state(h)
    ctx = None
    if need_ctx:
        ctx = _Context(
            "rnn", pack=pack, X=X, Hs=A, Hprev=Hprev, w_ih=w_ih, w_hh=w_hh, act=nonlinearity,
            has_b_ih=b_ih is not None, has_b_hh=b_hh is not None, dtype=dtype, H=H, Kh=Kh,
            M=M,
        )
    return y, h_n, ctx


def rnn_backward(dy: ArrayLike | None, dh_n: ArrayLike | None, ctx: _Context) -> CellGrads:
    """Gradients of rnn_forward. Returns dx, dh0, dw_ih, dw_hh, db_ih, db_hh
    (a bias gradient is None where that bias was None)."""
    s = _take_ctx(ctx, "rnn")
    pack, dtype, H = s["pack"], s["dtype"], s["H"]
    Hs, w_hh, Kh, M = s["Hs"], s["w_hh"], s["Kh"], s["M"]
    DY, dh = _grad_setup(pack, dy, dh_n, pack.B, H, dtype)
    # y may be a view of Hs, so the gradients go to a new array
    D = np.empty_like(Hs)
    for sl, bt in reversed(pack.steps):
        dht = dh[:bt]
        if DY is not None:
            dht += DY[sl]
        if Kh is not None:  # zoneout: the k part waits for dh_{t-1}
            carry = _at(Kh, sl) * dht
            dht *= 1 - _at(Kh, sl)
        ht, da = Hs[sl], D[sl]
        # da = dh act'(a): tanh' = 1 - h^2, relu' = [h > 0]
        if s["act"] == "tanh":
            np.multiply(ht, ht, out=da)
            np.subtract(1, da, out=da)
            da *= dht
        else:
            np.multiply(dht, ht > 0, out=da)
        np.matmul(da, w_hh, out=dht)  # dh_{t-1} = da W_hh (times the mask)
        if M is not None:
            dht *= M[:bt]
        if Kh is not None:
            dht += carry
    dh0 = pack.unsort_state(dh)
    dw_ih = D.T @ s["X"]
    dw_hh = D.T @ s["Hprev"]
    dx = pack.scatter(D @ s["w_ih"])
    db_ih, db_hh = _bias_grads(D.sum(axis=0), s["has_b_ih"], s["has_b_hh"])
    return dx, dh0, dw_ih, dw_hh, db_ih, db_hh
