"""A training loop for every task: epochs, held-out evaluation, early stopping, progress,
JSON-lines metrics, atomic checkpoints every epoch and exact resume, a loss-curve plot.

The loop knows nothing about the model's inputs; a *task* supplies them::

    task.model                  # an rnnfuse Module (named_parameters, grads, zero_grad, train, eval,
                                #  state_dict, load_state_dict)
    task.data                   # the training batches, BatchIterator's protocol: each ``for``
                                #  runs (the rest of) one epoch; len(); state_dict()/load_state_dict()
    task.train_step(batch)      # forward + backward (grads accumulate into model.grads);
                                #  returns (summed loss, units): units = tokens or samples
    task.evaluate()             # held-out metrics, a dict with at least "loss" (mean per unit)
    task.start_epoch()          # optional: called before an epoch is opened (e.g. zero a state)
    task.state_dict()           # optional: whatever else resuming needs (a carried state)
    task.load_state_dict(sd)

    result = fit(task, optimizer, epochs=10, patience=3, clip=1.0, save="ck.rnnf")

One optimizer step per batch: ``zero_grad``, ``train_step``, optional ``clip_grad_norm``,
``optimizer.step``, ``scheduler.step``. ``fit(..., resume=path)`` restores the model, the
optimizer, the schedule, the generator, the data position, the task state, the step and the
early-stopping bookkeeping, so the resumed run continues with exactly the losses the
uninterrupted run would have had.
"""
import json
import math
import os
import sys
import time

import numpy as np

from ._checks import first_line
from .checkpoint import CheckpointError, load_checkpoint, restore_checkpoint, save_checkpoint
from .optim import clip_grad_norm

__all__ = ["fit", "FitResult", "Progress", "TrainingError"]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says why."""


class FitResult(dict):
    """What ``fit`` returns: a dict with ``step``, ``epoch``, ``best`` (the best evaluation,
    a dict), ``last`` (the last one), ``history`` (every evaluation), ``stopped`` (why the
    loop ended: "epochs", "early_stopping", "max_steps", "max_seconds"), ``elapsed_s`` and
    ``losses`` (the training loss of every step, for tests and plots)."""

    __getattr__ = dict.__getitem__


# ---------------------------------------------------------------- progress

class Progress:
    """A progress display: tqdm when installed (and asked for), else a plain line every
    ``every`` seconds on ``stream``. ``update(n_steps, loss, units)``; ``close()``."""

    def __init__(self, total=None, desc="", unit="tok", stream=None, every=10.0, use_tqdm=True,
                 enabled=True):
        self.stream = sys.stderr if stream is None else stream
        self.unit, self.desc, self.every, self.enabled = unit, desc, every, enabled
        self._bar = None
        self._t0 = self._last = time.perf_counter()
        self._units = 0
        self._steps = 0
        self._loss = float("nan")
        if enabled and use_tqdm:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit="step", file=self.stream,
                                 leave=False, dynamic_ncols=True)

    def update(self, n, loss, units):
        self._steps += n
        self._units += units
        # an exponential moving average keeps the displayed loss readable
        self._loss = loss if math.isnan(self._loss) else 0.9 * self._loss + 0.1 * loss
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = self._units / max(now - self._t0, 1e-9)
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {self._loss:.4f}, {rate:,.0f} {self.unit}/s",
                                      refresh=False)
            self._bar.update(n)
        elif now - self._last >= self.every:
            self._last = now
            print(f"{self.desc} step {self._steps}: loss {self._loss:.4f}, "
                  f"{rate:,.0f} {self.unit}/s", file=self.stream, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ---------------------------------------------------------------- metrics and plot

def _append_jsonl(path, record):
    """Append one JSON line and flush it to disk (a crash loses at most the line being written)."""
    line = json.dumps(record, separators=(",", ":"), allow_nan=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def plot_losses(path, losses, history, title="training"):
    """Write a loss-curve PNG (training loss per step, held-out loss per evaluation).
    Returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if losses:
        ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.6, alpha=0.6, label="train loss")
    if history:
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], "o-",
                label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    except BaseException:  # leave no half-written file behind
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------- the loop

def _check_path_dir(name, path):
    """Checked before training, not at the first write: the directory exists and the
    path is not itself a directory."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{name}: directory does not exist: {directory}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{name}: path is a directory, not a file: {path}")


def fit(task, optimizer, *, epochs=1, scheduler=None, clip=None, patience=None, min_delta=0.0,
        eval_every=None, max_steps=None, max_seconds=None, metrics=None, save=None,
        resume=None, rng=None, progress=True, unit="tok", stream=None, plot=None,
        config=None, on_eval=None):
    """Train ``task.model`` with ``optimizer``; see the module docstring for ``task``.

    epochs : passes over ``task.data`` (counting those done before a resume)
    scheduler : an LRSchedule stepped after every optimizer step, or None
    clip : max global gradient norm (clip_grad_norm), or None
    patience : stop after this many evaluations without an improvement of the held-out
        loss by more than ``min_delta``; None: never stop early
    eval_every : also evaluate every this many steps (besides each epoch's end); None: epochs only
    max_steps, max_seconds : budgets; when reached the loop evaluates, saves, and stops
    metrics : path of a JSON-lines file; one line per evaluation, appended
    save : checkpoint path, written atomically after each epoch's evaluation and when a budget
        or early stopping ends the run
    resume : checkpoint path written by ``save`` for this same task and optimizer
    rng : a numpy Generator that the task draws from (shuffling); saved and restored
    progress : show progress on ``stream`` (stderr); ``unit`` names the task's units
    plot : path of a PNG loss curve (needs matplotlib; skipped with a note if absent)
    config : JSON-able dict stored in checkpoints; a resume checks it matches
    on_eval : optional callback ``on_eval(record)`` after each evaluation
    Returns a FitResult.
    """
    model = task.model
    stream = sys.stderr if stream is None else stream
    for name, p in (("metrics", metrics), ("save", save), ("plot", plot)):
        if p is not None:
            _check_path_dir(name, p)
    steps_per_epoch = len(task.data) if hasattr(task.data, "__len__") else None

    step, epoch, best, bad_evals, history, losses = 0, 0, None, 0, [], []
    epoch_open = False  # an epoch was started and not finished (after a mid-epoch resume)
    if resume is not None:
        head = load_checkpoint(resume, expected=model.state_dict())
        extra = head["extra"] if isinstance(head["extra"], dict) else {}
        if config is not None and extra.get("config") is not None:
            saved = extra["config"]
            diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
            if diff:
                raise CheckpointError(f"{os.path.basename(resume)}: checkpoint was made with a "
                                      f"different configuration ({', '.join(diff)})")
        try:
            restore_checkpoint(resume, model, optimizer, scheduler, rng,
                               data_iterator=task.data)
        except (ValueError, TypeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{os.path.basename(resume)}: checkpoint does not fit this "
                                  f"run: {first_line(e)}") from None
        fit_state = extra.get("fit") or {}
        step = head["step"]
        epoch = int(fit_state.get("epoch", 0))
        best = fit_state.get("best")
        bad_evals = int(fit_state.get("bad_evals", 0))
        history = list(fit_state.get("history", []))
        losses = [float(v) for v in np.asarray(fit_state.get("losses", np.zeros(0)))]
        epoch_open = bool(fit_state.get("epoch_open", False))
        if hasattr(task, "load_state_dict"):
            task.load_state_dict(extra.get("task"))

    def checkpoint():
        if save is None:
            return
        fit_state = {"epoch": epoch, "best": best, "bad_evals": bad_evals, "history": history,
                     "losses": np.asarray(losses, dtype=np.float64), "epoch_open": epoch_open}
        extra = {"fit": fit_state, "data": task.data.state_dict(), "config": config,
                 "task": task.state_dict() if hasattr(task, "state_dict") else None}
        save_checkpoint(save, model.state_dict(),
                        optimizer.state_dict(),
                        None if scheduler is None else scheduler.state_dict(),
                        None if rng is None else rng.bit_generator.state, step, extra)

    t0 = time.perf_counter()
    units_since, t_since = 0, time.perf_counter()

    def evaluate(kind):
        nonlocal best, bad_evals, units_since, t_since
        model.eval()
        m = dict(task.evaluate())
        model.train()
        now = time.perf_counter()
        rec = {"kind": kind, "epoch": epoch, "step": step,
               "train_loss": float(np.mean(losses[-100:])) if losses else None,
               **{k: (float(v) if isinstance(v, (np.floating, float)) else v)
                  for k, v in m.items()},
               f"{unit}_per_s": units_since / max(now - t_since, 1e-9),
               "lr": float(optimizer.lr), "elapsed_s": now - t0}
        units_since, t_since = 0, now
        if not math.isfinite(rec["loss"]):  # the model diverged: its checkpoint is worthless
            raise TrainingError(f"the held-out loss became {rec['loss']} at step {step}; "
                                "lower the learning rate or clip the gradients")
        if best is None or rec["loss"] < best["loss"] - min_delta:
            best, bad_evals = rec, 0
        else:
            bad_evals += 1
        rec["best_loss"] = best["loss"]
        history.append(rec)
        if metrics is not None:
            _append_jsonl(metrics, rec)
        if on_eval is not None:
            on_eval(rec)
        return rec

    stopped = None
    model.train()
    bar = Progress(total=None if steps_per_epoch is None else epochs * steps_per_epoch,
                   desc="train", unit=unit, stream=stream, enabled=progress)
    if bar._bar is not None:
        bar._bar.update(step)
    try:
        while epoch < epochs and stopped is None:
            if not epoch_open and hasattr(task, "start_epoch"):
                task.start_epoch()
            epoch_open = True
            for batch in task.data:
                model.zero_grad()
                loss_sum, units = task.train_step(batch)
                loss = float(loss_sum) / max(units, 1)
                if not math.isfinite(loss):
                    raise TrainingError(f"the training loss became {loss} at step {step + 1}; "
                                        "lower the learning rate or clip the gradients")
                if clip is not None:
                    clip_grad_norm(model.grads, clip)
                optimizer.step(model.grads)
                if scheduler is not None:
                    scheduler.step()
                step += 1
                losses.append(loss)
                units_since += units
                bar.update(1, loss, units)
                if max_steps is not None and step >= max_steps:
                    stopped = "max_steps"
                elif max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
                    stopped = "max_seconds"
                if stopped is not None:
                    break
                if eval_every and step % eval_every == 0:
                    evaluate("step")
                    if patience is not None and bad_evals >= patience:
                        stopped = "early_stopping"
                        break
            else:
                epoch += 1
                epoch_open = False
                evaluate("epoch")
                if patience is not None and bad_evals >= patience:
                    stopped = "early_stopping"
                checkpoint()
                continue
            # left the epoch early: a budget or early stopping
            if stopped in ("max_steps", "max_seconds"):
                evaluate("final")
            checkpoint()
    finally:
        bar.close()
    if stopped is None:
        stopped = "epochs"
    if plot is not None and plot_losses(plot, losses, history) is None:
        print("note: matplotlib is not installed; no plot written", file=stream)
    return FitResult(step=step, epoch=epoch, best=best, last=history[-1] if history else None,
                     history=history, stopped=stopped, elapsed_s=time.perf_counter() - t0,
                     losses=losses)


def fit_from_flags(task, optimizer, args, *, max_minutes, paths=lambda path: path, **kw):
    """fit() driven by the commands' shared flags (``rnnfuse.__main__._add_shared``):
    epochs, clip, patience, eval_every, steps, save/resume/metrics/plot (each passed through
    ``paths``, e.g. to give each of several models its own file) and quiet; ``max_minutes``
    is the command's resolved time budget (None: no limit). Other fit() arguments in ``kw``."""
    return fit(task, optimizer, epochs=args.epochs, clip=args.clip or None,
               patience=args.patience, eval_every=args.eval_every, max_steps=args.steps,
               max_seconds=None if max_minutes is None else max_minutes * 60,
               metrics=paths(args.metrics), save=paths(args.save), resume=paths(args.resume),
               plot=paths(args.plot), progress=not args.quiet, **kw)
