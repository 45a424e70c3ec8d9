"""Checked by mypy (see pyproject.toml), not run by pytest: the public API as a user's
code sees it. A wrong annotation in rnnfuse makes one of these lines a mypy error."""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

import rnnfuse
from rnnfuse import functional as F

Floats = NDArray[np.floating[Any]]


def kernels(x: Floats, w_ih: Floats, w_hh: Floats) -> Floats:
    y, h_n, c_n, ctx = F.lstm_forward(x, None, None, w_ih, w_hh, None, None, lengths=[3, 2])
    assert ctx is not None
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh = F.lstm_backward(y, None, None, ctx)
    bias_grad: Floats | None = db_ih
    y2, h2, ctx2 = rnnfuse.reference.gru_forward(x, h_n, w_ih, w_hh, None, None,
                                                 linear_before_reset=False)
    F.release_workspace()
    return dx + dh0.sum() + dc0.sum() + dw_ih.sum() + dw_hh.sum() + y2.sum() + h2.sum()


def prepacked(x: Floats, w_ih: Floats, w_hh: Floats) -> Floats:
    infer = F.Prepacked("gru", w_ih, w_hh, None, None, linear_before_reset=False)
    y, h_n = infer(x, None, lengths=[3, 2], reverse=True)
    return y + h_n.sum()


def training(x: Floats, targets: NDArray[np.int64]) -> float:
    model = rnnfuse.Sequential(rnnfuse.GRU(4, 8, seed=0), rnnfuse.Linear(8, 5, seed=1))
    opt = rnnfuse.Adam(model.named_parameters(), lr=1e-3)
    sched = rnnfuse.LinearWarmup(opt, 10, after=rnnfuse.CosineAnnealingLR(opt, T_max=90))
    logits, states = model(x)
    loss, dlogits = rnnfuse.cross_entropy(logits, targets, reduction="sum")
    model.backward(dlogits)
    norm: float = rnnfuse.clip_grad_norm(model.grads, max_norm=1.0)
    opt.step(model.grads)
    lr: float = sched.step()
    path: str = rnnfuse.save_checkpoint("ckpt.bin", model.state_dict(), opt.state_dict(),
                                        step=1)
    ckpt: dict[str, Any] = rnnfuse.restore_checkpoint(path, model, optimizer=opt)
    return float(loss) + norm + lr + len(ckpt)


def layers(x: Floats) -> None:
    lstm = rnnfuse.LSTM(4, 8, num_layers=2, bidirectional=True, dtype=np.float64)
    y, (h, c) = lstm.forward(x)
    dx, dstate = lstm.backward(y)
    stream: rnnfuse.Stream = rnnfuse.LSTM(4, 8).eval().stream(batch_size=1)
    y_t: Floats = stream.step(x[0])
    pool: rnnfuse.StreamPool = rnnfuse.GRU(4, 8).stream_pool(capacity=16)
    sid: int = pool.open()
    y_s: Floats = pool.step([sid], x[0, :1])
    h_s = pool.state(sid)
    pool.close(sid)
    onnx: list[dict[str, Any]] = rnnfuse.onnx_weights.to_onnx(lstm)
    rnnfuse.onnx_weights.from_onnx(lstm, onnx)
    version: str = rnnfuse.__version__
