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
from collections.abc import Callable
from typing import Any, Protocol, TextIO

import numpy as np

from ._checks import first_line
from .checkpoint import CheckpointError, load_checkpoint, restore_checkpoint, save_checkpoint
from .optim import clip_grad_norm

__all__ = ["fit", "FitResult", "Progress", "Task", "TrainingError"]

PathLike = str | os.PathLike


class Task(Protocol):
    """What fit() trains (see the module docstring; start_epoch, state_dict and
    load_state_dict are optional)."""

    model: Any
    data: Any

    def train_step(self, batch: Any) -> tuple[float, int]: ...

    def evaluate(self) -> dict[str, Any]: ...


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
    ``every`` seconds on ``stream``. ``initial``: the steps already done (a resumed run's
    bar starts there). ``update(n_steps, loss, units)``; ``close()``."""

    def __init__(self, total=None, desc="", unit="tok", stream=None, every=10.0, use_tqdm=True,
                 enabled=True, initial=0):
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
                                 leave=False, dynamic_ncols=True, initial=initial)

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


def fit(task: Task, optimizer: Any, *, epochs: int = 1, scheduler: Any = None,
        clip: float | None = None, patience: int | None = None, min_delta: float = 0.0,
        eval_every: int | None = None, max_steps: int | None = None,
        max_seconds: float | None = None, metrics: PathLike | None = None,
        save: PathLike | None = None, resume: PathLike | None = None,
        rng: np.random.Generator | None = None, progress: bool = True, unit: str = "tok",
        stream: TextIO | None = None, plot: PathLike | None = None,
        config: dict[str, Any] | None = None,
        on_eval: Callable[[dict[str, Any]], Any] | None = None) -> FitResult:
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
    stream = sys.stderr if stream is None else stream
    for name, p in (("metrics", metrics), ("save", save), ("plot", plot)):
        if p is not None:
            _check_path_dir(name, p)
    loop = _Loop(task, optimizer, scheduler=scheduler, rng=rng, clip=clip, patience=patience,
                 min_delta=min_delta, eval_every=eval_every, max_steps=max_steps,
                 max_seconds=max_seconds, metrics=metrics, save=save, unit=unit,
                 config=config, on_eval=on_eval)
    if resume is not None:
        loop.resume(resume)
    loop.run(epochs, progress, stream)
    st = loop.state
    if plot is not None and plot_losses(plot, st.losses, st.history) is None:
        print("note: matplotlib is not installed; no plot written", file=stream)
    return FitResult(step=st.step, epoch=st.epoch, best=st.best,
                     last=st.history[-1] if st.history else None, history=st.history,
                     stopped=st.stopped, elapsed_s=time.perf_counter() - loop.t0,
                     losses=st.losses)


class _FitState:
    """Where the loop stands: what a checkpoint saves of it (``fields``, and the step in
    the checkpoint's header) and why it stopped."""

    fields = ("epoch", "best", "bad_evals", "history", "losses", "epoch_open")

    def __init__(self):
        self.step = 0              # optimizer steps taken
        self.epoch = 0             # epochs completed
        self.best = None           # the evaluation with the lowest loss
        self.bad_evals = 0         # evaluations since it
        self.history = []          # every evaluation
        self.losses = []           # the training loss of every step
        self.epoch_open = False    # an epoch was started and not finished
        self.stopped = None        # why the loop ended, once it has

    def state_dict(self):
        return {"epoch": self.epoch, "best": self.best, "bad_evals": self.bad_evals,
                "history": self.history, "losses": np.asarray(self.losses, dtype=np.float64),
                "epoch_open": self.epoch_open}

    def load_state_dict(self, fit_state, step):
        self.step = step
        self.epoch = int(fit_state.get("epoch", 0))
        self.best = fit_state.get("best")
        self.bad_evals = int(fit_state.get("bad_evals", 0))
        self.history = list(fit_state.get("history", []))
        self.losses = [float(v) for v in np.asarray(fit_state.get("losses", np.zeros(0)))]
        self.epoch_open = bool(fit_state.get("epoch_open", False))


def _mask_generators(model):
    """The generators model's layers draw their dropout masks from, in the order of
    ``model.modules()``: a resumed run must go on drawing where the saved one stopped."""
    modules = model.modules() if hasattr(model, "modules") else ()
    return [m._rng for m in modules if isinstance(getattr(m, "_rng", None), np.random.Generator)]


def _check_generator_states(path, generators, states):
    """Refuse saved generator states that do not fit the model's, before anything changes."""
    name = os.path.basename(path)
    if not isinstance(states, list) or len(states) != len(generators):
        raise CheckpointError(f"{name}: checkpoint has the mask generators of another model "
                              f"({len(generators)} expected)")
    for g, st in zip(generators, states):
        kind = type(g.bit_generator).__name__
        if not isinstance(st, dict) or st.get("bit_generator") != kind:
            raise CheckpointError(f"{name}: a saved mask generator state does not fit {kind}")


class _Loop:
    """One fit(): the task and its optimizer, the settings, the state, and the steps
    fit() is made of (resume, run, epoch, train step, evaluation, checkpoint)."""

    def __init__(self, task, optimizer, *, scheduler, rng, clip, patience, min_delta,
                 eval_every, max_steps, max_seconds, metrics, save, unit, config, on_eval):
        self.task, self.model, self.optimizer = task, task.model, optimizer
        self.scheduler, self.rng = scheduler, rng
        self.clip, self.patience, self.min_delta = clip, patience, min_delta
        self.eval_every, self.max_steps, self.max_seconds = eval_every, max_steps, max_seconds
        self.metrics, self.save, self.unit = metrics, save, unit
        self.config, self.on_eval = config, on_eval
        self.state = _FitState()
        self.t0 = self.t_since = time.perf_counter()
        self.units_since = 0  # units trained since the last evaluation

    def resume(self, path):
        """Restore the model, optimizer, schedule, generator, data position, task and loop
        state from a checkpoint of ``save``; refuse one of another configuration."""
        head = load_checkpoint(path, expected=self.model.state_dict())
        extra = head["extra"] if isinstance(head["extra"], dict) else {}
        saved = extra.get("config")
        if self.config is not None and saved is not None:
            diff = sorted(k for k in set(saved) | set(self.config)
                          if saved.get(k) != self.config.get(k))
            if diff:
                raise CheckpointError(f"{os.path.basename(path)}: checkpoint was made with a "
                                      f"different configuration ({', '.join(diff)})")
        generators, states = _mask_generators(self.model), extra.get("mask_generators")
        if states is not None:  # (absent from checkpoints of older versions)
            _check_generator_states(path, generators, states)
        try:
            restore_checkpoint(path, self.model, self.optimizer, self.scheduler, self.rng,
                               data_iterator=self.task.data)
        except (ValueError, TypeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{os.path.basename(path)}: checkpoint does not fit this "
                                  f"run: {first_line(e)}") from None
        for g, st in zip(generators, states or []):
            g.bit_generator.state = st
        self.state.load_state_dict(extra.get("fit") or {}, head["step"])
        if hasattr(self.task, "load_state_dict"):
            self.task.load_state_dict(extra.get("task"))

    def run(self, epochs, progress, stream):
        """Epochs until ``epochs`` are done or a budget or early stopping ends the run."""
        st = self.state
        self.t0 = self.t_since = time.perf_counter()
        data = self.task.data
        per_epoch = len(data) if hasattr(data, "__len__") else None
        self.model.train()
        bar = Progress(total=None if per_epoch is None else epochs * per_epoch,
                       initial=st.step, desc="train", unit=self.unit, stream=stream,
                       enabled=progress)
        try:
            while st.epoch < epochs and st.stopped is None:
                self.epoch(bar)
        finally:
            bar.close()
        if st.stopped is None:
            st.stopped = "epochs"

    def epoch(self, bar):
        """The rest of one epoch: its steps, the evaluations due, the checkpoint at its end
        (or where a budget or early stopping cuts it short)."""
        st = self.state
        if not st.epoch_open and hasattr(self.task, "start_epoch"):
            self.task.start_epoch()
        st.epoch_open = True
        for batch in self.task.data:
            self.train_step(batch, bar)
            if self.max_steps is not None and st.step >= self.max_steps:
                st.stopped = "max_steps"
            elif (self.max_seconds is not None
                  and time.perf_counter() - self.t0 >= self.max_seconds):
                st.stopped = "max_seconds"
            if st.stopped is not None:
                break
            if self.eval_every and st.step % self.eval_every == 0:
                self.evaluate("step")
                if self._out_of_patience():
                    st.stopped = "early_stopping"
                    break
        else:
            st.epoch += 1
            st.epoch_open = False
            self.evaluate("epoch")
            if self._out_of_patience():
                st.stopped = "early_stopping"
            self.checkpoint()
            return
        # left the epoch early: a budget or early stopping
        if st.stopped in ("max_steps", "max_seconds"):
            self.evaluate("final")
        self.checkpoint()

    def _out_of_patience(self):
        return self.patience is not None and self.state.bad_evals >= self.patience

    def train_step(self, batch, bar):
        """One optimizer step: zero_grad, the task's forward and backward, clip, step."""
        st = self.state
        self.model.zero_grad()
        loss_sum, units = self.task.train_step(batch)
        loss = float(loss_sum) / max(units, 1)
        if not math.isfinite(loss):
            raise TrainingError(f"the training loss became {loss} at step {st.step + 1}; "
                                "lower the learning rate or clip the gradients")
        if self.clip is not None:
            clip_grad_norm(self.model.grads, self.clip)
        self.optimizer.step(self.model.grads)
        if self.scheduler is not None:
            self.scheduler.step()
        st.step += 1
        st.losses.append(loss)
        self.units_since += units
        bar.update(1, loss, units)

    def evaluate(self, kind):
        """Held-out metrics as a record (kept, written to the metrics file, passed to
        on_eval); the early-stopping bookkeeping. A non-finite loss ends training."""
        st = self.state
        self.model.eval()
        try:
            m = dict(self.task.evaluate())
        finally:  # training goes on (or is resumed) in training mode whatever evaluate did
            self.model.train()
        now = time.perf_counter()
        rec = {"kind": kind, "epoch": st.epoch, "step": st.step,
               "train_loss": float(np.mean(st.losses[-100:])) if st.losses else None,
               **{k: (float(v) if isinstance(v, (np.floating, float)) else v)
                  for k, v in m.items()},
               f"{self.unit}_per_s": self.units_since / max(now - self.t_since, 1e-9),
               "lr": float(self.optimizer.lr), "elapsed_s": now - self.t0}
        self.units_since, self.t_since = 0, now
        if not math.isfinite(rec["loss"]):  # the model diverged: its checkpoint is worthless
            raise TrainingError(f"the held-out loss became {rec['loss']} at step {st.step}; "
                                "lower the learning rate or clip the gradients")
        if st.best is None or rec["loss"] < st.best["loss"] - self.min_delta:
            st.best, st.bad_evals = rec, 0
        else:
            st.bad_evals += 1
        rec["best_loss"] = st.best["loss"]
        st.history.append(rec)
        if self.metrics is not None:
            _append_jsonl(self.metrics, rec)
        if self.on_eval is not None:
            self.on_eval(rec)
        return rec

    def checkpoint(self):
        """Write the checkpoint of ``save`` (atomically), if there is one."""
        if self.save is None:
            return
        task, sched = self.task, self.scheduler
        extra = {"fit": self.state.state_dict(), "data": task.data.state_dict(),
                 "config": self.config,
                 "task": task.state_dict() if hasattr(task, "state_dict") else None,
                 "mask_generators": [g.bit_generator.state
                                     for g in _mask_generators(self.model)]}
        save_checkpoint(self.save, self.model.state_dict(), self.optimizer.state_dict(),
                        None if sched is None else sched.state_dict(),
                        None if self.rng is None else self.rng.bit_generator.state,
                        self.state.step, extra)
