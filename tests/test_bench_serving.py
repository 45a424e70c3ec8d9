"""``python -m rnnfuse bench --serving``: sessions stepped by a pool, by streams and by the
peers, each checked against the layer's forward before it is timed (quick, tiny budget)."""
import json
import sys

import numpy as np
import pytest

from rnnfuse import bench

QUICK = ["--serving", "--quick", "--impls", "rnnfuse", "--budget", "0.01"]


def table(text):
    """{impl: [ms/step, us/session, sessions/core, vs streams]} of the printed table."""
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in bench.SERVING_IMPLS:
            rows[parts[0]] = parts[1:]
    return rows


def test_serving_prints_pool_and_streams_with_their_ratio(tmp_path, capsys):
    path = tmp_path / "serving.json"
    assert bench.main(QUICK + ["--json", str(path)]) == 0
    rows = table(capsys.readouterr().out)
    assert set(rows) == {"pool", "streams"}
    assert rows["streams"][3] == "1.00" and all(float(v) > 0 for v in rows["pool"])
    saved = json.loads(path.read_text())
    assert saved["frame_s"] == 0.032 and saved["machine"]["threads"] == 1
    row = saved["serving"][0]
    assert set(row["seconds"]) == {"pool", "streams"} and row["errors"] == {}
    n, pool = bench.SERVING_QUICK[0].sessions, row["seconds"]["pool"]
    assert row["per_session"]["pool"] == pytest.approx(pool / n)
    assert row["sessions_per_core"]["pool"] == pytest.approx(0.032 * n / pool)
    assert row["vs_streams"]["pool"] == pytest.approx(row["seconds"]["streams"] / pool)
    assert row["vs_streams"]["streams"] == 1.0
    assert float(rows["pool"][2]) == pytest.approx(row["sessions_per_core"]["pool"], abs=1)


@pytest.mark.parametrize("flag", [["--markdown", "-"], ["--modes", "inference"],
                                  ["--shapes", "0"]])
def test_serving_refuses_grid_flags_before_running(flag, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(QUICK + flag)
    assert e.value.code == 2
    assert f"{flag[0]} does not apply to --serving" in capsys.readouterr().err


def test_serving_check_catches_a_wrong_stepper():
    shape = bench.ServingShape("gru", 3, 4, 5)
    layer = bench.serving_layer(shape)
    x = np.random.default_rng(0).standard_normal((3, 3, 4)).astype(np.float32)
    right = bench.serving_stepper("pool", layer, 3)
    assert bench.serving_check("pool", right, layer, x) == 0.0  # bitwise: batch invariance
    wrong = bench.serving_stepper("streams", layer, 3)
    with pytest.raises(AssertionError, match="serving streams: y differs"):
        bench.serving_check("streams", lambda xt: wrong(xt[::-1]), layer, x)


@pytest.mark.parametrize("impl,module", [("torch", "torch"), ("torch-batch", "torch"),
                                         ("onnxruntime", "onnxruntime"),
                                         ("onnxruntime-batch", "onnxruntime")])
@pytest.mark.parametrize("cell,layers", [("lstm", 2), ("gru", 1)])
def test_serving_peers_keep_each_sessions_state(impl, module, cell, layers):
    pytest.importorskip(module)
    if module == "onnxruntime":
        pytest.importorskip("onnx")
    shape = bench.ServingShape(cell, 3, 4, 6, layers)
    layer = bench.serving_layer(shape)
    x = np.random.default_rng(1).standard_normal((4, 3, 4)).astype(np.float32)
    assert bench.serving_check(impl, bench.serving_stepper(impl, layer, 3), layer, x) < 1e-5


def test_serving_skips_missing_peers_cleanly(monkeypatch, capsys):
    for name in ("torch", "onnx", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    assert bench.main(["--serving", "--quick", "--budget", "0.01"]) == 0
    out, err = capsys.readouterr()
    assert set(table(out)) == {"pool", "streams"}
    assert "skipped: PyTorch is not installed" in err and "skipped: onnxruntime" in err


def test_serving_on_the_cpu_clock(capsys):
    assert bench.main(QUICK + ["--clock", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "CPU time of the one thread" in out and set(table(out)) == {"pool", "streams"}
