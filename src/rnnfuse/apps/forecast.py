"""``python -m rnnfuse forecast``: next-value forecasting of a univariate time series.

A window of ``--window`` past values -> the next value (recurrent stack, final hidden
state, Linear), trained with mean squared error on values standardized with the training
statistics; the split is chronological (the last ``--heldout`` of the windows are held
out). The held-out RMSE is reported beside two baselines fitted on the same windows:
persistence (the last value) and a linear autoregression (least squares, with intercept).

Without ``--csv`` the series is the Mackey-Glass delay differential equation
dx/dt = 0.2 x(t-tau) / (1 + x(t-tau)^10) - 0.1 x(t), tau = 17, integrated with RK4 at
dt = 0.1 from x = 1.2 and sampled every 6 time units (the classic x(t+6) benchmark
setting), after discarding a transient.
"""
import argparse
import csv
import json

import numpy as np

from ..data import PairBatches
from .common import (FinalState, InputError, add_shared_flags, check_flags, check_interval,
                     check_shared_flags, fit_from_flags, progress_stream)

__all__ = ["add_parser", "run", "mackey_glass", "read_csv_column", "Forecast"]


# ---------------------------------------------------------------- data

def mackey_glass(n, tau=17.0, dt=0.1, sample_every=6.0, x0=1.2, discard=200,
                 beta=0.2, gamma=0.1, power=10):
    """``n`` samples of the Mackey-Glass series (float64), deterministic.

    RK4 with step ``dt``; the delayed value at a half step is the mean of its neighbours
    on the grid; constant history ``x0``; ``discard`` samples of transient are dropped;
    one sample every ``sample_every`` time units."""
    lag, every = int(round(tau / dt)), int(round(sample_every / dt))
    steps = (n + discard) * every
    x = np.empty(lag + steps + 1)
    x[:lag + 1] = x0

    def f(xt, xd):
        return beta * xd / (1.0 + xd ** power) - gamma * xt

    for i in range(lag, lag + steps):
        xd, xd1, xi = x[i - lag], x[i - lag + 1], x[i]
        xm = 0.5 * (xd + xd1)
        k1 = f(xi, xd)
        k2 = f(xi + 0.5 * dt * k1, xm)
        k3 = f(xi + 0.5 * dt * k2, xm)
        k4 = f(xi + dt * k3, xd1)
        x[i + 1] = xi + dt / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    return x[lag + discard * every::every][:n].copy()


def read_csv_column(path, column=None):
    """The values of ``column`` of a CSV file with a header row, as float64.

    ``column`` may be omitted when the file has a single column. Raises InputError (one
    line) for a missing or unreadable file, a missing column (listing the columns), or a
    value that is not a finite number (naming its line)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if not header:
                raise InputError(f"CSV file is empty: {path}")
            header = [h.strip() for h in header]
            if column is None:
                if len(header) != 1:
                    raise InputError(f"{path} has {len(header)} columns; choose one with "
                                     f"--column ({', '.join(map(repr, header))})")
                column = header[0]
            if column not in header:
                raise InputError(f"{path} has no column {column!r}; its columns are "
                                 f"{', '.join(map(repr, header))}")
            j, values = header.index(column), []
            for row in rows:
                if not row or all(not c.strip() for c in row):
                    continue  # blank line
                line = rows.line_num
                cell = row[j].strip() if j < len(row) else ""
                try:
                    v = float(cell)
                except ValueError:
                    v = None
                if v is None or not np.isfinite(v):
                    raise InputError(f"{path}, line {line}: column {column!r} holds "
                                     f"{cell!r}, not a finite number")
                values.append(v)
    except FileNotFoundError:
        raise InputError(f"CSV file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"CSV path is a directory, not a file: {path}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"CSV file is not valid UTF-8: {path} (byte {e.start})") from None
    except csv.Error as e:
        raise InputError(f"{path}: not a readable CSV file ({e})") from None
    except OSError as e:
        raise InputError(f"cannot read CSV file {path}: {e.strerror or e}") from None
    return np.asarray(values, dtype=np.float64), column


# ---------------------------------------------------------------- the task

class Forecast:
    """x (N, W, 1) standardized windows, y (N, 1) the standardized next value."""

    def __init__(self, model, x_train, y_train, x_held, y_held, batch_size, seed, scale,
                 eval_batch=1024):
        self.model = model
        self.data = PairBatches(x_train, y_train, batch_size, seed)
        self.x_held, self.y_held, self.scale, self.eval_batch = x_held, y_held, scale, eval_batch

    def train_step(self, batch):
        from ..losses import mse_loss
        x, y = batch
        pred = self.model.forward(x)
        loss, dpred = mse_loss(pred, y)
        self.model.backward(dpred)
        return float(loss) * len(y), len(y)

    def predict(self, x):
        out = [self.model.forward(np.ascontiguousarray(x[a:a + self.eval_batch].swapaxes(0, 1)))
               for a in range(0, len(x), self.eval_batch)]
        return np.concatenate(out)

    def evaluate(self):
        err = self.predict(self.x_held).astype(np.float64) - self.y_held
        mse = float(np.mean(err ** 2))
        return {"loss": mse, "rmse": float(np.sqrt(mse)) * self.scale}


# ---------------------------------------------------------------- command

def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "forecast", help="forecast the next value of a time series",
        description="Next-value forecasting: a window of past values -> the next value "
        "(recurrent stack -> final hidden state -> Linear, MSE on standardized values, "
        "chronological split). Reports held-out RMSE beside persistence and a least-squares "
        "linear autoregression on the same window. Without --csv: the Mackey-Glass series "
        "(tau=17, sampled every 6 time units).")
    p.add_argument("--csv", metavar="FILE", help="CSV file with a header row (default: the "
                   "generated Mackey-Glass series)")
    p.add_argument("--column", metavar="NAME", help="the CSV column to forecast (needed when "
                   "the file has more than one column)")
    p.add_argument("--length", type=int, default=3000,
                   help="samples of the generated series (default: %(default)s)")
    p.add_argument("--window", type=int, default=16,
                   help="past values the model sees (default: %(default)s)")
    p.add_argument("--heldout", type=float, default=0.2,
                   help="fraction of the windows held out, the latest (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="windows per batch (default: %(default)s)")
    add_shared_flags(p, hidden=32, layers=1, epochs=60)
    p.set_defaults(max_minutes=4.0)
    return p


def _check(args):
    check_shared_flags(args)
    check_flags(args, "window", "length")
    check_interval("--heldout", args.heldout, 0, 1)
    if args.column is not None and args.csv is None:
        raise InputError("--column needs --csv")


def _series(args):
    """(the series, a description of where it comes from)."""
    if args.csv is not None:
        series, column = read_csv_column(args.csv, args.column)
        return series, f"{args.csv} column {column!r}"
    return mackey_glass(args.length), "Mackey-Glass (tau=17, every 6 time units)"


class _Split:
    """The windows of a series, split chronologically (the last ``heldout`` fraction held
    out), standardized with the statistics of every value the training windows touch; and
    the two baselines' held-out RMSE in the series' units."""

    def __init__(self, series, W, heldout, source):
        n = len(series) - W  # windows
        n_held = int(round(n * heldout))
        if n - n_held < 2 or n_held < 1:
            raise InputError(f"too few values ({len(series)}) for a window of {W} and a "
                             f"{heldout:g} held-out fraction; need at least "
                             f"{W + 3 + int(np.ceil(2 * heldout / (1 - heldout)))} rows")
        windows = np.lib.stride_tricks.sliding_window_view(series[:-1], W)  # (n, W)
        target = series[W:]
        cut = n - n_held
        mean = float(series[:cut + W].mean())
        std = float(series[:cut + W].std())
        if not std > 0:
            raise InputError(f"the training part of {source} is constant; nothing to learn")
        z = lambda a: (a - mean) / std  # noqa: E731
        self.xs = z(windows)[..., None].astype(np.float32)
        self.ys = z(target)[:, None].astype(np.float32)
        self.cut, self.n_held, self.std = cut, n_held, std
        y_held = target[cut:]
        self.z_held = z(y_held)[:, None]
        self.persist = float(np.sqrt(np.mean((windows[cut:, -1] - y_held) ** 2)))
        A = np.c_[windows, np.ones(n)]
        coef = np.linalg.lstsq(A[:cut], target[:cut], rcond=None)[0]
        self.linear = float(np.sqrt(np.mean((A[cut:] @ coef - y_held) ** 2)))


def run(args: argparse.Namespace) -> int:
    """The command: train on the series' windows, print the held-out RMSE beside the
    baselines. Returns the exit status."""
    from threadpoolctl import threadpool_limits

    from .. import optim

    _check(args)
    series, source = _series(args)
    W = args.window
    d = _Split(series, W, args.heldout, source)
    persist, linear, cut = d.persist, d.linear, d.cut
    model = FinalState(args.cell, 1, args.hidden, args.layers, 1, seed=args.seed)
    opt = optim.Adam(model.named_parameters(), lr=args.lr)
    task = Forecast(model, d.xs[:cut], d.ys[:cut], d.xs[cut:], d.z_held, args.batch,
                    args.seed, d.std)
    config = {"task": "forecast", "cell": args.cell, "hidden": args.hidden,
              "layers": args.layers, "window": W, "batch": args.batch,
              "source": source, "values": int(len(series))}
    with progress_stream(args.quiet) as out, threadpool_limits(limits=args.threads):
        print(f"forecast: {source}: {len(series)} values, window {W}, {cut} training / "
              f"{d.n_held} held-out windows; baselines: persistence RMSE {persist:.5g}, "
              f"linear AR({W}) RMSE {linear:.5g}", file=out)

        def report(rec):
            print(f"eval  epoch {rec['epoch']} step {rec['step']}: held-out RMSE "
                  f"{rec['rmse']:.5g} (persistence {persist:.5g}, linear {linear:.5g}), "
                  f"{rec['elapsed_s']:.0f} s", file=out, flush=True)

        result = fit_from_flags(task, opt, args, max_minutes=args.max_minutes, unit="win",
                                stream=out, config=config, on_eval=report)
    rmse = result.last["rmse"]
    ratio = (f"{rmse / linear:.3f}x the linear baseline" if linear > 0
             else "the linear baseline is exact")  # a series that is linear in its window
    print(f"held-out RMSE: {rmse:.5g} (persistence {persist:.5g}, linear AR({W}) "
          f"{linear:.5g}; {ratio}) after {result.step} steps, "
          f"{result.elapsed_s:.0f} s ({result.stopped})")
    if args.json:
        print(json.dumps({"command": "forecast", "rmse": rmse, "best_rmse": result.best["rmse"],
                          "persistence_rmse": persist, "linear_rmse": linear,
                          "mse_standardized": result.last["loss"], "steps": result.step,
                          "epochs": result.epoch, "stopped": result.stopped,
                          "elapsed_s": round(result.elapsed_s, 3), "train_windows": int(cut),
                          "heldout_windows": int(d.n_held), **config, "seed": args.seed}))
    return 0
