"""The layer-normalized LSTM and GRU (haste's form) in plain NumPy: reference.py's
``lstm_forward``/``gru_forward`` with ``layer_norm=`` and their backward, written step by
step from the definitions, as the oracle of the kernels in csrc/layernorm.c.

    LN(v; g) = g (v - mean(v)) / sqrt(var(v) + 1e-5), mean and (biased) var over a row
    gates = LN(W_ih x_t; g_ih) + LN(W_hh h_{t-1}; g_hh) + b_ih + b_hh
    LSTM: c_t = f c_{t-1} + i g, h_t = o tanh(LN(c_t; g_c) + b_c)
    GRU (linear_before_reset): r, z = sigmoid(a_rz + b_rz + b_ih_rz + b_hh_rz),
        n = tanh(a_n + b_in + r (b_n + b_hn)), h_t = (1 - z) n + z h_{t-1},
        with a = LN(W_ih x_t; g_ih) and b = LN(W_hh h_{t-1}; g_hh)
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import reference as R

EPS = 1e-5
NAMES = {"lstm": ("g_ih", "g_hh", "g_c", "b_c"), "gru": ("g_ih", "g_hh")}


def arrays(cell: str, layer_norm: Any, dtype: np.dtype[Any]) -> list[NDArray[Any]]:
    """layer_norm's arrays in NAMES' order, from a tuple or a dict."""
    if isinstance(layer_norm, dict):
        layer_norm = [layer_norm[n] for n in NAMES[cell]]
    return [np.asarray(a, dtype=dtype) for a in layer_norm]


def _ln(v: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
    """Each row of v normalized, and its 1 / sqrt(var + eps) as a column."""
    d = v - v.mean(axis=1, keepdims=True)
    rstd = 1 / np.sqrt((d * d).mean(axis=1, keepdims=True) + EPS)
    return d * rstd, rstd


def _ln_back(da: NDArray[Any], g: NDArray[Any], n: NDArray[Any],
             rstd: NDArray[Any]) -> NDArray[Any]:
    """The gradient of v from that of g n, n = the rows of v normalized."""
    dn = da * g
    return rstd * (dn - dn.mean(axis=1, keepdims=True) - n * (dn * n).mean(axis=1, keepdims=True))


def _bias(b_ih: Any, b_hh: Any, G: int, H: int, dtype: np.dtype[Any],
          skip_hh_block: int | None = None) -> NDArray[Any]:
    b = R._folded_bias(b_ih, b_hh, G, H, dtype, skip_hh_block)
    return np.zeros(G * H, dtype) if b is None else b


def _start(x: Any, w_ih: Any, w_hh: Any, lengths: Any, reverse: bool, zoneout: Any,
           recurrent_dropout: Any, lstm: bool) -> tuple[Any, ...]:
    x, dtype, T, B, H, pack = R._setup(x, w_ih, w_hh, lengths, reverse)
    Kh, Kc = R._zoneout_weights(pack, zoneout, lstm, dtype)
    M = R._recdrop_rows(pack, recurrent_dropout, dtype)
    X = pack.gather(x)
    return dtype, B, H, pack, X, X @ np.asarray(w_ih).T, Kh, Kc, M


def _saved(N: int, G: int, H: int, dtype: np.dtype[Any], rows: tuple[str, ...],
           stats: tuple[str, ...]) -> dict[str, NDArray[Any]]:
    """What each step keeps for backward: the gates and both normalized products (G*H
    wide), the cell's rows (H wide) and its rows' 1 / sqrt(var + eps) (one column each)."""
    S = {k: np.empty((N, G * H), dtype) for k in ("gates", "nih", "nhh")}
    S.update({k: np.empty((N, H), dtype) for k in rows})
    S.update({k: np.empty((N, 1), dtype) for k in stats})
    return S


def _context(cell: str, need_ctx: bool, pack: Any, X: Any, w_ih: Any, w_hh: Any, b_ih: Any,
             b_hh: Any, dtype: np.dtype[Any], H: int, ln: tuple[Any, ...],
             S: dict[str, Any], **masks: Any) -> Any:
    """The forward's ctx for backward (None without need_ctx); masks: Kh, Kc, M."""
    if not need_ctx:
        return None
    return R._Context(cell, pack=pack, X=X, w_ih=w_ih, w_hh=w_hh, dtype=dtype, H=H,
                      has_b_ih=b_ih is not None, has_b_hh=b_hh is not None, ln=ln, S=S,
                      **masks)


def lstm_forward(x: Any, h0: Any, c0: Any, w_ih: Any, w_hh: Any, b_ih: Any, b_hh: Any,
                 lengths: Any, reverse: bool, need_ctx: bool, layer_norm: Any, zoneout: Any,
                 recurrent_dropout: Any) -> tuple[Any, ...]:
    dtype, B, H, pack, X, XP, Kh, Kc, M = _start(x, w_ih, w_hh, lengths, reverse, zoneout,
                                                recurrent_dropout, True)
    g_ih, g_hh, g_c, b_c = arrays("lstm", layer_norm, dtype)
    bias = _bias(b_ih, b_hh, 4, H, dtype)
    h, c = pack.sort_state(h0, (B, H), dtype), pack.sort_state(c0, (B, H), dtype)
    N = pack.n
    Y = np.empty((N, H), dtype)
    S = _saved(N, 4, H, dtype, ("nc", "tc", "hm", "cp"), ("rih", "rhh", "rc"))
    for sl, bt in pack.steps:
        hp, cp = h[:bt], c[:bt]
        hm = R._masked(hp, M)
        nih, rih = _ln(XP[sl])
        nhh, rhh = _ln(hm @ np.asarray(w_hh).T)
        a = g_ih * nih + g_hh * nhh + bias
        i, f = R._sigmoid_(a[:, :H].copy()), R._sigmoid_(a[:, H:2 * H].copy())
        g, o = np.tanh(a[:, 2 * H:3 * H]), R._sigmoid_(a[:, 3 * H:].copy())
        c_new = f * cp + i * g
        nc, rc = _ln(c_new)
        tc = np.tanh(g_c * nc + b_c)
        h_new = o * tc
        for k, v in (("gates", np.concatenate([i, f, g, o], axis=1)), ("nih", nih),
                     ("nhh", nhh), ("nc", nc), ("tc", tc), ("hm", hm), ("cp", cp),
                     ("rih", rih), ("rhh", rhh), ("rc", rc)):
            S[k][sl] = v
        c[:bt] = c_new if Kc is None else R._zone(R._at(Kc, sl), cp, c_new)
        h[:bt] = h_new if Kh is None else R._zone(R._at(Kh, sl), hp, h_new)
        Y[sl] = h[:bt]
    ctx = _context("lstm", need_ctx, pack, X, w_ih, w_hh, b_ih, b_hh, dtype, H,
                   (g_ih, g_hh, g_c), S, Kh=Kh, Kc=Kc, M=M)
    return pack.scatter(Y), pack.unsort_state(h), pack.unsort_state(c), ctx


def lstm_backward(dy: Any, dh_n: Any, dc_n: Any, s: dict[str, Any]) -> tuple[Any, ...]:
    pack, dtype, H, S, Kh, Kc, M = (s[k] for k in ("pack", "dtype", "H", "S", "Kh", "Kc", "M"))
    g_ih, g_hh, g_c = s["ln"]
    w_hh = np.asarray(s["w_hh"])
    DY, dh = R._grad_setup(pack, dy, dh_n, pack.B, H, dtype)
    dc = pack.sort_state(dc_n, (pack.B, H), dtype)
    N = pack.n
    DA, DIH, DHH = (np.empty((N, 4 * H), dtype) for _ in range(3))
    DU = np.empty((N, H), dtype)
    for sl, bt in reversed(pack.steps):
        dht, dct = dh[:bt], dc[:bt]
        if DY is not None:
            dht += DY[sl]
        carry_h = carry_c = 0
        if Kh is not None:
            carry_h, dht[...] = R._at(Kh, sl) * dht, (1 - R._at(Kh, sl)) * dht
        if Kc is not None:
            carry_c, dct[...] = R._at(Kc, sl) * dct, (1 - R._at(Kc, sl)) * dct
        gates, tc = S["gates"][sl], S["tc"][sl]
        i, f, g, o = (gates[:, k * H:(k + 1) * H] for k in range(4))
        du = dht * o * (1 - tc * tc)  # h = o tanh(u), u = LN(c) + b_c
        da_o = dht * tc * o * (1 - o)
        dct += _ln_back(du, g_c, S["nc"][sl], S["rc"][sl])
        da = np.concatenate([dct * g * i * (1 - i), dct * S["cp"][sl] * f * (1 - f),
                             dct * i * (1 - g * g), da_o], axis=1)
        dct *= f
        dct += carry_c
        DA[sl], DU[sl] = da, du
        DIH[sl] = _ln_back(da, g_ih, S["nih"][sl], S["rih"][sl])
        DHH[sl] = _ln_back(da, g_hh, S["nhh"][sl], S["rhh"][sl])
        dht[...] = DHH[sl] @ w_hh
        if M is not None:
            dht *= M[:bt]
        dht += carry_h
    db_ih, db_hh = R._bias_grads(DA.sum(axis=0), s["has_b_ih"], s["has_b_hh"])
    return (pack.scatter(DIH @ np.asarray(s["w_ih"])), pack.unsort_state(dh),
            pack.unsort_state(dc), DIH.T @ s["X"], DHH.T @ S["hm"], db_ih, db_hh,
            (DA * S["nih"]).sum(axis=0), (DA * S["nhh"]).sum(axis=0),
            (DU * S["nc"]).sum(axis=0), DU.sum(axis=0))


def gru_forward(x: Any, h0: Any, w_ih: Any, w_hh: Any, b_ih: Any, b_hh: Any, lengths: Any,
                reverse: bool, need_ctx: bool, layer_norm: Any, zoneout: Any,
                recurrent_dropout: Any) -> tuple[Any, ...]:
    dtype, B, H, pack, X, XP, Kh, _, M = _start(x, w_ih, w_hh, lengths, reverse, zoneout,
                                               recurrent_dropout, False)
    g_ih, g_hh = arrays("gru", layer_norm, dtype)
    bias = _bias(b_ih, b_hh, 3, H, dtype, skip_hh_block=2)
    b_hn = np.zeros(H, dtype) if b_hh is None else np.asarray(b_hh, dtype)[2 * H:]
    h = pack.sort_state(h0, (B, H), dtype)
    N = pack.n
    Y = np.empty((N, H), dtype)
    S = _saved(N, 3, H, dtype, ("hl", "hm", "hp"), ("rih", "rhh"))
    for sl, bt in pack.steps:
        hp = h[:bt]
        hm = R._masked(hp, M)
        nih, rih = _ln(XP[sl])
        nhh, rhh = _ln(hm @ np.asarray(w_hh).T)
        a, b = g_ih * nih, g_hh * nhh
        rz = R._sigmoid_(a[:, :2 * H] + b[:, :2 * H] + bias[:2 * H])
        r, z = rz[:, :H], rz[:, H:]
        hl = b[:, 2 * H:] + b_hn
        n = np.tanh(a[:, 2 * H:] + bias[2 * H:] + r * hl)
        h_new = (1 - z) * n + z * hp
        for k, v in (("gates", np.concatenate([r, z, n], axis=1)), ("nih", nih),
                     ("nhh", nhh), ("hl", hl), ("hm", hm), ("hp", hp), ("rih", rih),
                     ("rhh", rhh)):
            S[k][sl] = v
        h[:bt] = h_new if Kh is None else R._zone(R._at(Kh, sl), hp, h_new)
        Y[sl] = h[:bt]
    ctx = _context("gru", need_ctx, pack, X, w_ih, w_hh, b_ih, b_hh, dtype, H, (g_ih, g_hh),
                   S, Kh=Kh, M=M)
    return pack.scatter(Y), pack.unsort_state(h), ctx


def gru_backward(dy: Any, dh_n: Any, s: dict[str, Any]) -> tuple[Any, ...]:
    pack, dtype, H, S, Kh, M = (s[k] for k in ("pack", "dtype", "H", "S", "Kh", "M"))
    g_ih, g_hh = s["ln"]
    w_hh = np.asarray(s["w_hh"])
    DY, dh = R._grad_setup(pack, dy, dh_n, pack.B, H, dtype)
    N = pack.n
    DAI, DAH, DIH, DHH = (np.empty((N, 3 * H), dtype) for _ in range(4))
    for sl, bt in reversed(pack.steps):
        dht = dh[:bt]
        if DY is not None:
            dht += DY[sl]
        carry = 0
        if Kh is not None:
            carry, dht[...] = R._at(Kh, sl) * dht, (1 - R._at(Kh, sl)) * dht
        gates = S["gates"][sl]
        r, z, n = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:]
        dn = dht * (1 - z) * (1 - n * n)
        dz = dht * (S["hp"][sl] - n) * z * (1 - z)
        dr = dn * S["hl"][sl] * r * (1 - r)
        DAI[sl] = np.concatenate([dr, dz, dn], axis=1)
        DAH[sl] = np.concatenate([dr, dz, dn * r], axis=1)
        DIH[sl] = _ln_back(DAI[sl], g_ih, S["nih"][sl], S["rih"][sl])
        DHH[sl] = _ln_back(DAH[sl], g_hh, S["nhh"][sl], S["rhh"][sl])
        d_prev = DHH[sl] @ w_hh
        if M is not None:
            d_prev *= M[:bt]
        dht[...] = dht * z + d_prev + carry
    return (pack.scatter(DIH @ np.asarray(s["w_ih"])), pack.unsort_state(dh),
            DIH.T @ s["X"], DHH.T @ S["hm"],
            DAI.sum(axis=0) if s["has_b_ih"] else None,
            DAH.sum(axis=0) if s["has_b_hh"] else None,
            (DAI * S["nih"]).sum(axis=0), (DAH * S["nhh"]).sum(axis=0))
