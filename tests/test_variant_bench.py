"""``python -m rnnfuse bench --variants``: the LSTM variants' training steps against the
plain cell and against the same model in PyTorch, each PyTorch model checked against
rnnfuse before it is timed (quick shape, tiny budget)."""
import json

import numpy as np
import pytest

from rnnfuse import bench

QUICK = ["--variants", "--quick", "--budget", "0.01"]
RUN_TODAY = ("plain", "peepholes", "zoneout", "recurrent_dropout", "weight_drop")


def table(text):
    """{variant: [rnnfuse ms, vs plain, torch ms, torch model..., torch x]} as printed."""
    names = {v.name for v in bench.VARIANTS}
    return {p[0]: p[1:] for p in map(str.split, text.splitlines()) if p and p[0] in names}


def test_variants_print_each_variant_against_plain(tmp_path, capsys):
    path = tmp_path / "variants.json"
    assert bench.main(QUICK + ["--impls", "rnnfuse", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    assert set(RUN_TODAY) <= set(rows) and rows["plain"][1] == "1.000"
    assert all(float(r[0]) > 0 and r[2] == "-" for r in rows.values())
    row = json.loads(path.read_text())["variants"][0]
    assert (row["T"], row["B"], row["I"], row["H"]) == (6, 3, 5, 8)
    assert row["torch"] == {} and row["vs_plain"]["plain"] == 1.0
    for v, s in row["rnnfuse"].items():
        assert row["vs_plain"][v] == pytest.approx(s / row["rnnfuse"]["plain"])
    # every variant is timed or skipped with its reason, never silently dropped
    assert set(row["rnnfuse"]) | set(row["errors"]) == {v.name for v in bench.VARIANTS}
    for v, why in row["errors"].items():
        assert why.startswith(f"skipped (rnnfuse.LSTM(") and f"    {v}: {why}" in out


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_variants_against_pytorch(clock, capsys):
    pytest.importorskip("torch")
    assert bench.main(QUICK + ["--impls", "torch", "--clock", clock]) == 0
    out = capsys.readouterr().out
    assert ("CPU time of the one thread" in out) == (clock == "cpu")
    rows = table(out)
    for v in RUN_TODAY:
        assert rows[v][3:5] == ["LSTMCell", "loop"] and float(rows[v][5]) > 0


def test_a_layer_keyword_that_does_not_exist_is_skipped_with_a_note():
    bogus = bench.Variant("bogus", lambda H: {"bogus": H})
    row = bench.variant_case(bench.VARIANT_QUICK[0], 0.01, (bench.VARIANTS[0], bogus),
                             with_torch=False)
    assert set(row["rnnfuse"]) == {"plain"}
    assert row["errors"]["bogus"].startswith("skipped (rnnfuse.LSTM(bogus=8): ")


@pytest.mark.parametrize("name", ["peepholes", "zoneout"])
def test_check_catches_a_pytorch_model_that_differs(name):
    torch = pytest.importorskip("torch")
    variant = {v.name: v for v in bench.VARIANTS}[name]
    shape = bench.VARIANT_QUICK[0]
    layer = bench.variant_layer(variant, shape)
    x, dy = bench.variant_problem(layer, shape)
    model = bench.torch_variant_model(variant, layer)
    assert bench.variant_check(variant, layer, model, x, dy) < 1e-5
    if name == "peepholes":
        with torch.no_grad():  # ONNX's order i, o, f read as i, f, o
            model.peep.copy_(model.peep.view(3, -1)[[0, 2, 1]].reshape(-1))
    else:
        model.zoneout = 0.2
    with pytest.raises(AssertionError, match="torch: .* differs from rnnfuse's by"):
        bench.variant_check(variant, layer, model, x, dy)


def test_nn_lstm_peer_runs_and_is_checked():
    """The projection's peer, torch.nn.LSTM with the row's keywords, on the plain LSTM."""
    pytest.importorskip("torch")
    as_nn_lstm = bench.Variant("plain", lambda H: {}, peer="nn.LSTM")
    row = bench.variant_case(bench.VARIANT_QUICK[0], 0.01, (as_nn_lstm,))
    assert row["errors"] == {} and row["torch_over_rnnfuse"]["plain"] > 0
    assert row["peers"] == {"plain": "nn.LSTM"}


def test_pytorch_loop_model_names_every_parameter_the_table_maps():
    torch = pytest.importorskip("torch")
    loop = bench._loop_lstm(torch)(5, 8, peepholes=True, layer_norm=True, zoneout=0.1,
                                   recurrent_dropout=0.2, weight_drop=0.3)
    assert set(dict(loop.named_parameters())) == set(bench._LOOP_NAMES.values())
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 3, 5))
                         .astype(np.float32))
    for mode in (loop.train(), loop.eval()):
        y = mode(x)
        assert y.shape == (4, 3, 8) and torch.isfinite(y).all()
        y.sum().backward()


@pytest.mark.parametrize("flag", [["--markdown", "-"], ["--dtypes", "float64"],
                                  ["--serving"], ["--shapes", "0"]])
def test_variants_refuse_other_modes_flags_before_running(flag, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(QUICK + flag)
    assert e.value.code == 2
    assert f"{flag[0]} does not apply to --variants" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--quick", "--clock", "cpu", "--markdown", "-"],
                                  QUICK + ["--clock", "cpu", "--threads", "2"]])
def test_cpu_clock_only_at_one_thread_without_markdown(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    assert ("--clock cpu applies at --threads 1 only, without --markdown"
            in capsys.readouterr().err)
