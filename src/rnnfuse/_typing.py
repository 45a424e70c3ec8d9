"""Type aliases of the annotated public API (for type checkers; nothing here runs)."""
from __future__ import annotations

from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray

#: An array of float32 or float64 (the dtypes of the kernels, layers, losses and optimizers).
FloatArray: TypeAlias = NDArray[np.floating[Any]]
#: A recurrent layer's state: ``h`` (GRU, RNN) or ``(h, c)`` (LSTM).
State: TypeAlias = "FloatArray | tuple[FloatArray, FloatArray]"
#: lstm_backward's gradients: dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh (None: no bias).
LSTMGrads: TypeAlias = tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray,
                             "FloatArray | None", "FloatArray | None"]
#: gru_backward's and rnn_backward's: dx, dh0, dw_ih, dw_hh, db_ih, db_hh (None: no bias).
CellGrads: TypeAlias = tuple[FloatArray, FloatArray, FloatArray, FloatArray,
                             "FloatArray | None", "FloatArray | None"]
