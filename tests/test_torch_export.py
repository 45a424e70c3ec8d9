"""rnnfuse.torch's modules through torch.onnx.export, the TorchScript-based exporter
(dynamo=False) and the torch.export-based one (dynamo=True): standard ONNX LSTM and GRU
nodes, one per layer (bidirectional in one node), that onnxruntime runs to the modules'
outputs. Skipped when PyTorch, onnx or onnxruntime is absent.
"""
import io
import warnings

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import rnnfuse.torch as rt  # noqa: E402

MODULES = {"lstm": (rt.LSTM, {}), "gru": (rt.GRU, {}),
           "rnn_relu": (rt.RNN, {"nonlinearity": "relu"})}
NODE = {"lstm": "LSTM", "gru": "GRU", "rnn_relu": "RNN"}


class Wrapper(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, h):
        return self.rnn(x, h)


def _state(kind, L, B, H):
    h = torch.randn(L, B, H)
    return (h, torch.randn(L, B, H)) if kind == "lstm" else h


def _flat(out):
    y, s = out
    return [y, *(s if isinstance(s, tuple) else (s,))]


def _export(model, args, names, dynamo):
    """The ONNX model's bytes, with the length and batch dynamic."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and progress notes
        if dynamo:
            pytest.importorskip("onnxscript")  # the exporter's own dependency
            from torch.export import Dim
            T, B = Dim("T", min=2, max=512), Dim("B", min=2, max=512)
            h = ({1: B}, {1: B}) if len(names) == 3 else {1: B}
            program = torch.onnx.export(model, args, dynamo=True, verbose=False,
                                        dynamic_shapes={"x": {0: T, 1: B}, "h": h})
            return program.model_proto.SerializeToString()
        f = io.BytesIO()
        torch.onnx.export(model, args, f, dynamo=False, opset_version=17, input_names=names,
                          dynamic_axes={"x": {0: "T", 1: "B"},
                                        **{k: {1: "B"} for k in names[1:]}})
        return f.getvalue()


def _recurrent_nodes(model_bytes):
    graph = onnx.load_from_string(model_bytes).graph
    return [n for n in graph.node if n.op_type in ("LSTM", "GRU", "RNN")]


def _attribute(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("kind", list(MODULES))
def test_onnx_export_one_node_per_layer_that_onnxruntime_runs(kind, dynamo):
    cls, extra = MODULES[kind]
    torch.manual_seed(1)
    model = Wrapper(cls(3, 5, num_layers=2, bidirectional=True, **extra)).eval()
    names = ["x", "h0", "c0"] if kind == "lstm" else ["x", "h0"]
    data = _export(model, (torch.randn(6, 2, 3), _state(kind, 4, 2, 5)), names, dynamo)
    nodes = _recurrent_nodes(data)
    assert [n.op_type for n in nodes] == [NODE[kind]] * 2  # one per layer
    assert all(_attribute(n, "direction") == b"bidirectional" for n in nodes)
    if kind == "gru":
        assert all(_attribute(n, "linear_before_reset") == 1 for n in nodes)
    session = ort.InferenceSession(data)
    x, h = torch.randn(9, 4, 3), _state(kind, 4, 4, 5)  # another length and batch
    states = h if kind == "lstm" else (h,)
    inputs = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(inputs, [x.numpy(), *(s.numpy() for s in states)])))
    with torch.no_grad():
        want = _flat(model(x, h))
    assert len(got) == len(want)
    for a, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(a), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
def test_onnx_export_of_peepholes_gives_the_p_input(bidirectional, dynamo):
    """An LSTM with peepholes (random, not their initial zeros) exports as ONNX LSTM
    nodes with the input P, which onnxruntime runs to the module's outputs."""
    torch.manual_seed(3)
    model = Wrapper(rt.LSTM(3, 5, num_layers=2, bidirectional=bidirectional,
                            peepholes=True)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "peep" in name:
                p.copy_(torch.randn_like(p))
    L = 4 if bidirectional else 2
    data = _export(model, (torch.randn(6, 2, 3), _state("lstm", L, 2, 5)),
                   ["x", "h0", "c0"], dynamo)
    nodes = _recurrent_nodes(data)
    assert [n.op_type for n in nodes] == ["LSTM"] * 2
    assert all(len(n.input) == 8 and n.input[7] != "" for n in nodes)  # P given
    session = ort.InferenceSession(data)
    x, h = torch.randn(9, 4, 3), _state("lstm", L, 4, 5)
    inputs = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(inputs, [x.numpy(), *(s.numpy() for s in h)])))
    with torch.no_grad():
        want = _flat(model(x, h))
    for a, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(a), w, rtol=1e-4, atol=1e-5)


def test_onnx_export_of_peepholes_refuses_a_packed_sequence():
    class PackedPeepholes(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rt.LSTM(3, 4, peepholes=True)

        def forward(self, x, lengths):
            return self.rnn(pack_padded_sequence(x, lengths, enforce_sorted=False))[1][0]

    with pytest.raises(RuntimeError, match=r"LSTM with peepholes=True exports to ONNX over "
                       r"a padded tensor, not a PackedSequence"):
        torch.onnx.export(PackedPeepholes().eval(), (torch.randn(5, 2, 3),
                                                     torch.tensor([5, 2])),
                          io.BytesIO(), dynamo=False)


class Packed(nn.Module):
    """A bidirectional GRU over a padded batch with lengths, through a PackedSequence."""

    def __init__(self):
        super().__init__()
        self.rnn = rt.GRU(3, 4, bidirectional=True)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        y, h = self.rnn(packed)
        return pad_packed_sequence(y, total_length=x.shape[0])[0], h


def test_onnx_export_of_a_packed_sequence_gives_sequence_lens():
    torch.manual_seed(2)
    model = Packed().eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(5, 3, 3), torch.tensor([5, 2, 4])), f,
                          dynamo=False, opset_version=17, input_names=["x", "lengths"],
                          dynamic_axes={"x": {0: "T", 1: "B"}, "lengths": {0: "B"}})
    (node,) = _recurrent_nodes(f.getvalue())
    assert node.op_type == "GRU" and node.input[4] != ""  # sequence_lens given
    assert _attribute(node, "direction") == b"bidirectional"
    x, lengths = torch.randn(7, 4, 3), torch.tensor([7, 1, 4, 6])
    got = ort.InferenceSession(f.getvalue()).run(None, {"x": x.numpy(),
                                                        "lengths": lengths.numpy()})
    with torch.no_grad():
        want = model(x, lengths)
    for a, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(a), w, rtol=1e-4, atol=1e-5)
