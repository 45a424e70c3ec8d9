"""The forecast and classify commands, driven through their own parsers."""
import argparse
import json

import numpy as np
import pytest

from rnnfuse.apps import classify as cmd_classify
from rnnfuse.apps import forecast as cmd_forecast
from rnnfuse.apps.common import FinalState, InputError


def parse(mod, *argv):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    mod.add_parser(sub)
    return p.parse_args([mod.__name__.rsplit(".", 1)[1], *map(str, argv)])


def last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return out, json.loads(out[-1])


# ---------------------------------------------------------------- forecast

def test_mackey_glass_is_deterministic_and_bounded():
    a, b = cmd_forecast.mackey_glass(300), cmd_forecast.mackey_glass(300)
    assert a.shape == (300,) and np.array_equal(a, b)
    assert 0.2 < a.min() < a.max() < 1.5 and a.std() > 0.1


def test_forecast_default_series_beats_persistence(capsys):
    args = parse(cmd_forecast, "--length", "400", "--window", "8", "--hidden", "16",
                 "--epochs", "8", "--quiet", "--json")
    assert cmd_forecast.run(args) == 0
    out, rec = last_json(capsys)
    assert out[-2].startswith("held-out RMSE:") and "persistence" in out[-2]
    assert rec["command"] == "forecast" and rec["epochs"] == 8
    assert 0 < rec["rmse"] < rec["persistence_rmse"]
    assert rec["linear_rmse"] > 0 and rec["train_windows"] + rec["heldout_windows"] == 392


def test_forecast_csv_column_and_resume(tmp_path, capsys):
    t = np.arange(120)
    rows = ["time,value,label"] + [f"{i},{np.sin(i / 5):.6f},x" for i in t]
    f = tmp_path / "s.csv"
    f.write_text("\n".join(rows) + "\n")
    ck = tmp_path / "ck.rnnf"
    common = ["--csv", f, "--column", "value", "--window", "6", "--hidden", "8", "--quiet",
              "--json"]
    assert cmd_forecast.run(parse(cmd_forecast, *common, "--epochs", "2", "--save", ck)) == 0
    _, full = last_json(capsys)
    assert cmd_forecast.run(parse(cmd_forecast, *common, "--epochs", "1", "--save", ck)) == 0
    capsys.readouterr()
    assert cmd_forecast.run(parse(cmd_forecast, *common, "--epochs", "2", "--resume", ck)) == 0
    _, resumed = last_json(capsys)
    assert resumed["rmse"] == full["rmse"] and resumed["steps"] == full["steps"]
    assert "'value'" in full["source"]


@pytest.mark.parametrize("content, argv, needle", [
    (None, ["--column", "v"], "not found"),
    ("a,b\n1,2\n", ["--column", "v"], "no column 'v'; its columns are 'a', 'b'"),
    ("a,b\n1,2\n", [], "choose one with --column"),
    ("v\n1\n2\nabc\n4\n", [], "line 4"),
    ("v\n1\n2\n\n", [], "too few values"),
    ("v\n" + "3\n" * 30, [], "constant"),
])
def test_forecast_bad_input(tmp_path, content, argv, needle):
    f = tmp_path / "in.csv"
    if content is not None:
        f.write_text(content)
    with pytest.raises(InputError, match=needle) as e:
        cmd_forecast.run(parse(cmd_forecast, "--csv", f, *argv, "--window", "4", "--quiet"))
    assert "\n" not in str(e.value)


def test_forecast_bad_flags():
    with pytest.raises(InputError, match="--window"):
        cmd_forecast.run(parse(cmd_forecast, "--window", "0"))
    with pytest.raises(InputError, match="--column needs --csv"):
        cmd_forecast.run(parse(cmd_forecast, "--column", "x"))


# ---------------------------------------------------------------- classify

def test_classify_digits(capsys):
    pytest.importorskip("sklearn")
    args = parse(cmd_classify, "--hidden", "32", "--epochs", "4", "--lr", "0.01", "--quiet",
                 "--json")
    assert cmd_classify.run(args) == 0
    out, rec = last_json(capsys)
    assert out[-2].startswith("test accuracy:")
    assert rec["command"] == "classify" and rec["classes"] == 10
    assert rec["train_sequences"] + rec["test_sequences"] == 1797
    assert rec["accuracy"] > 0.5  # well above the 10% majority class after 4 epochs


def test_classify_bidirectional_npz(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    x = rng.normal(size=(200, 5, 3)).astype(np.float32)
    x[:, 0, 0] += 3 * (2 * y - 1)  # the class shows at the first step only
    f = tmp_path / "d.npz"
    np.savez(f, x=x, y=y)
    args = parse(cmd_classify, "--npz", f, "--bidirectional", "--hidden", "8", "--epochs",
                 "30", "--lr", "0.02", "--quiet", "--json")
    assert cmd_classify.run(args) == 0
    _, rec = last_json(capsys)
    assert rec["bidirectional"] and rec["test_sequences"] == 40 and rec["accuracy"] > 0.9


def test_final_state_gradient_matches_finite_differences():
    from rnnfuse.losses import mse_loss
    model = FinalState("gru", 3, 4, 2, 2, bidirectional=True, seed=1, dtype=np.float64)
    x = np.random.default_rng(2).normal(size=(5, 2, 3))
    t = np.random.default_rng(3).normal(size=(2, 2))
    model.zero_grad()
    loss, d = mse_loss(model.forward(x), t)
    model.backward(d)
    name = "0.weight_hh_l1_reverse"
    p, g = model.named_parameters()[name], model.grads[name]
    eps, i = 1e-6, (1, 2)
    p[i] += eps
    up = float(mse_loss(model.forward(x), t)[0])
    p[i] -= 2 * eps
    down = float(mse_loss(model.forward(x), t)[0])
    p[i] += eps
    assert abs((up - down) / (2 * eps) - g[i]) < 1e-6


def test_classify_bad_npz(tmp_path):
    f = tmp_path / "bad.npz"
    np.savez(f, x=np.zeros((4, 2, 1)))
    with pytest.raises(InputError, match="lacks array"):
        cmd_classify.run(parse(cmd_classify, "--npz", f, "--quiet"))
    with pytest.raises(InputError, match="not found"):
        cmd_classify.run(parse(cmd_classify, "--npz", tmp_path / "nope.npz", "--quiet"))


def test_classify_without_sklearn_says_what_to_install(monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("sklearn"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(InputError, match=r"rnnfuse\[examples\]") as e:
        cmd_classify.run(parse(cmd_classify, "--quiet"))
    assert "\n" not in str(e.value)
