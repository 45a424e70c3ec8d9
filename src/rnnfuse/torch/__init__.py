"""PyTorch modules over the rnnfuse kernels: drop-in ``torch.nn.LSTM``, ``GRU`` and ``RNN``.

::

    import torch
    from rnnfuse.torch import LSTM, swap_modules

    lstm = LSTM(64, 128, num_layers=2, bidirectional=True)   # as torch.nn.LSTM(...)
    y, (h_n, c_n) = lstm(x)            # x (T, B, 64), (B, T, 64) if batch_first, (T, 64)
                                       # unbatched, or a PackedSequence
    lstm.load_state_dict(torch_lstm.state_dict())            # and the other way round
    swapped = swap_modules(model)      # in place: every torch.nn.LSTM/GRU/RNN in model

The modules are subclasses of their ``torch.nn`` namesakes (``isinstance(lstm,
torch.nn.LSTM)``; ``_flat_weights`` and the rest of torch.nn's attributes are there): they
take the same constructor arguments, have the same ``forward(input, hx=None)``, return the
same outputs, and register the same parameters (``weight_ih_l0``, ``bias_hh_l1_reverse``,
...) with the same initialisation, so state dicts load both ways and ``torch.optim`` trains
them. Only ``forward`` differs: it runs on rnnfuse's kernels. What rnnfuse does not do is refused at
construction: devices other than the CPU, dtypes other than float32 and float64. The
LSTM takes ``proj_size``; as rnnfuse extensions, LSTM, GRU and RNN also take rnnfuse's cell
variants as keyword arguments (``peepholes``, ``layer_norm``, ``zoneout``,
``recurrent_dropout``, ``weight_drop``; see ``LSTM``), eagerly and under the tracers below.

Each direction of each layer is one call of an autograd Function over
``rnnfuse.functional``: ``LSTMFunction``, ``GRUFunction``, ``RNNFunction``. Tensors reach
the kernels as NumPy views (no copy when contiguous) and come back with
``torch.from_numpy``. When autograd records nothing (``torch.no_grad()``,
``torch.inference_mode()``, or no input or parameter requires grad) the kernels run with
``need_ctx=False`` and keep no training workspace; eval mode alone does not turn gradients
off, as in torch.nn (it only turns dropout off). Backward may run again over a graph kept
with ``retain_graph=True`` (it replays the forward); double backward (``create_graph=True``)
is refused.

The cells, ``LSTMCell``, ``GRUCell`` and ``RNNCell``, run one step of the kernels per
call (with a small autograd Function when gradients are recorded) and keep their
parameters checked and packed between calls. For generation, ``module.stream(batch_size=1,
state=None)`` of an LSTM, GRU or RNN in eval mode gives a :class:`Stream`:
``stream.step(x_t)`` advances every layer by one step in one call of the kernels, bit for
bit the module's forward over the whole sequence (``stream.state``, ``stream.reset()``).

Under tracing the modules call the same kernels as PyTorch operators instead,
``torch.ops.rnnfuse.lstm``, ``gru`` and ``rnn`` (with their backward operators and
autograd formula; the cell variants and the projection as their trailing arguments; see
"custom operators" in _ops), which tracers record:
``torch.compile(model, fullgraph=True)`` compiles them without a graph break,
``torch.export.export`` exports them with a dynamic sequence length and batch
(``torch.export.Dim``), ``torch.jit.trace`` records the operator (not its output), and
``torch.func``'s ``grad``, ``vmap`` and ``vmap`` over ``grad`` (per-example gradients)
transform them (first derivatives only, as above); a PackedSequence goes through
compilation too (``torch.ops.rnnfuse.unpack`` and ``pack``). Eager calls keep the
direct path above, which costs less per call. The operators' training workspaces are
kept per thread for reuse; ``release_workspace()`` frees them. Dynamo refuses
subclasses of torch.nn's RNNs unless ``torch._dynamo.config.allow_rnn`` is set;
rnnfuse's modules are let in without changing that setting (torch.nn's own RNNs still
graph-break). ``torch.onnx.export`` writes one standard ONNX LSTM, GRU or RNN node per
layer (both directions in one; the GRU with linear_before_reset=1), with either
exporter: ``dynamo=True`` with the length and batch dynamic, ``dynamo=False`` also for
PackedSequence input (lengths as sequence_lens).
``torch.jit.script(model)`` scripts the twins by itself and, as it does with any module's
``__prepare_scriptable__``, leaves them in ``model``.

Every call runs the kernels on PyTorch's thread count, ``torch.get_num_threads()``
(``torch.set_num_threads``, ``OMP_NUM_THREADS``; torchrun sets one per process), not the
BLAS's, so DistributedDataParallel processes do not oversubscribe the cores.

Importing this module needs PyTorch; ``import rnnfuse`` never imports it. (The
parts: _functions, the autograd Functions; _ops, the operators; _dispatch, which of
the two a call takes; _modules, the modules and cells; _onnx, _dynamo, _swap.)
"""
from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as e:
    raise ImportError(f"rnnfuse.torch needs PyTorch, which could not be imported ({e}); "
                      "install it with `pip install torch`") from e

from . import _dynamo
from ._functions import GRUFunction, LSTMFunction, RNNFunction
from ._modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, Stream
from ._ops import release_workspace
from ._swap import _new_fused, swap_modules, unswap_modules  # noqa: F401 (_new_fused: pickles)

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "Stream", "LSTMFunction",
           "GRUFunction", "RNNFunction", "swap_modules", "unswap_modules",
           "release_workspace"]

# The public names live here, whichever private module defines them (their pickles too).
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name

_dynamo.install()
