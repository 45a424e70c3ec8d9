"""Micro-batching: many client threads, one stream pool, one kernel call per batch.

A server that gives each client its own thread (a socket, a queue, a request handler)
and runs one recurrent session per client steps each session with its own stream:
one kernel call, and its fixed overhead, per session per frame. ``MicroBatcher`` puts a
stream pool behind those threads instead: each ``step(sid, x)`` call waits until a batch
is run, the batcher collects the steps that arrive within ``max_wait`` seconds of the
first (or stops waiting as soon as every open session has asked), runs them as one
``pool.step(ids, x)`` (one kernel call per layer, the GIL released), and hands each
thread its own row.

Usage::

    import numpy as np
    import rnnfuse
    from microbatch import MicroBatcher

    layer = rnnfuse.LSTM(64, 128, seed=0).eval()
    with MicroBatcher(layer.stream_pool(capacity=256), max_wait=0.002) as batcher:
        sid = batcher.open()                    # in a client's thread
        y = batcher.step(sid, x)                # x (64,) float32 -> y (128,), blocks
        batcher.close(sid)

Numbers: a session's outputs are bitwise those of its own stream of batch 1 (the pool's
steps are batch-invariant), whichever sessions share its batches.

Threads: one worker thread runs the batches. A stream pool refuses overlapping calls
(RuntimeError), so the batcher serialises every call on the pool (steps, open, close,
state) behind one lock. Each session has at most one step in flight; a step's input is
checked in the caller's thread, so a bad input fails that call alone.

Latency: a step waits at most ``max_wait`` for its batch to fill, plus the batch's run.
With ``max_wait=0`` a batch holds whatever arrived while the previous one ran.

Run ``python examples/serving/microbatch.py`` for a demo that times client threads
through the batcher against the same threads each owning a stream.
"""
import math
import threading
import time

import numpy as np

__all__ = ["MicroBatcher"]


class _Request:
    __slots__ = ("sid", "x", "y", "error", "ready", "next")

    def __init__(self, sid, x):
        self.sid, self.x, self.y, self.error, self.next = sid, x, None, None, None
        self.ready = threading.Lock()  # held until the worker has run this step
        self.ready.acquire()


class MicroBatcher:
    """Steps of many threads' sessions of one stream pool, collected into batches.

    ``pool``: a stream pool (``layer.stream_pool(capacity)``), used only through this
    batcher from now on. ``max_wait``: seconds a batch waits for more steps after its
    first one arrives (a batch runs at once when every open session has asked).
    ``open``, ``step``, ``state`` and ``close`` may be called from any thread; ``close()``
    with no argument (or leaving the ``with`` block) stops the batcher.
    """

    def __init__(self, pool, max_wait=0.002):
        if not all(hasattr(pool, a) for a in ("open", "step", "state", "close")):
            raise TypeError(f"pool must be a stream pool (layer.stream_pool(capacity)), "
                            f"got {type(pool).__name__}")
        if not isinstance(max_wait, (int, float)) or not 0 <= max_wait < math.inf:
            raise ValueError(f"max_wait must be seconds >= 0, got {max_wait!r}")
        self.pool = pool
        self.max_wait = float(max_wait)
        self._pool_lock = threading.Lock()  # one call on the pool at a time
        self._lock = threading.Lock()       # the batcher's own records below
        self._arrived = threading.Condition(self._lock)  # the worker waits for steps here
        self._pending = []                  # requests not yet in a batch, oldest first
        self._busy = set()                  # sessions with a step in flight
        self._open = set()                  # sessions opened through this batcher
        self._stopped = False
        self._worker = threading.Thread(target=self._serve, name="MicroBatcher", daemon=True)
        self._worker.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def open(self, state=None):
        """Start a session (``state`` as ``pool.open`` takes it) and return its id."""
        with self._pool_lock:
            sid = self.pool.open(state)
        with self._lock:
            self._open.add(sid)
        return sid

    def state(self, sid):
        """Session sid's state, as ``pool.state`` returns it."""
        with self._pool_lock:
            return self.pool.state(sid)

    def close(self, sid=None):
        """End session sid (not while it has a step in flight); with no sid, stop the
        batcher: the steps already asked for run, later ones raise RuntimeError."""
        if sid is None:
            with self._lock:
                self._stopped = True
                self._arrived.notify()
            self._worker.join()
            return
        with self._lock:
            self._check_sid(sid)
            self._open.discard(sid)
        with self._pool_lock:
            self.pool.close(sid)

    def step(self, sid, x):
        """Advance session sid by one timestep: x (input_size,) in the pool's dtype ->
        y (hidden_size,). Blocks until the batch holding this step has run."""
        x = np.asarray(x)
        if x.dtype != self.pool.dtype:
            raise TypeError(f"x must have dtype {self.pool.dtype} (the pool's dtype), "
                            f"got {x.dtype}")
        if x.shape != (self.pool.input_size,):
            raise ValueError(f"x must have shape ({self.pool.input_size},) (input_size,), "
                             f"got {x.shape}")
        request = _Request(sid, x)
        with self._lock:
            if self._stopped:
                raise RuntimeError("the batcher is closed")
            self._check_sid(sid)
            self._busy.add(sid)
            self._pending.append(request)
            if len(self._pending) == 1 or len(self._pending) >= len(self._open):
                self._arrived.notify()  # wake the worker: a first step, or all are in
        request.ready.acquire()
        if request.next is not None:  # wake the batch's next caller: one at a time
            request.next.ready.release()
        if request.error is not None:
            raise request.error
        return request.y

    def _check_sid(self, sid):
        """Under self._lock: sid is an open session with no step in flight."""
        if sid not in self._open:
            raise ValueError(f"sid: {sid!r} is not an open session of this batcher")
        if sid in self._busy:
            raise RuntimeError(f"sid: session {sid} has a step in flight (one at a time "
                               f"per session)")

    def _next_batch(self):
        """The requests of the next batch, or None once stopped with nothing pending."""
        with self._lock:
            while not self._pending and not self._stopped:
                self._arrived.wait()
            if not self._pending:
                return None
            deadline = time.monotonic() + self.max_wait
            while len(self._pending) < len(self._open) and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.wait(left)
            batch, self._pending = self._pending, []
            return batch

    def _serve(self):
        while (batch := self._next_batch()) is not None:
            ids = np.array([r.sid for r in batch], np.int64)
            try:
                with self._pool_lock:
                    y = self.pool.step(ids, np.stack([r.x for r in batch]))
                for r, row in zip(batch, y):
                    r.y = row
            except Exception as e:  # delivered to every caller of the batch
                for r in batch:
                    r.error = e
            with self._lock:
                self._busy.difference_update(r.sid for r in batch)
            for r, later in zip(batch, batch[1:]):
                r.next = later
            batch[0].ready.release()  # each caller wakes the next


# --------------------------------------------------------------------------------- demo

def clients(step_of, n_clients, steps, input_size, dtype=np.float32):
    """Run n_clients threads, thread k calling ``step_of(k)(x)`` ``steps`` times with its
    own inputs; returns (seconds, the outputs of each client (steps, hidden_size))."""
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((n_clients, steps, input_size)).astype(dtype)
    outputs = [None] * n_clients
    start = threading.Barrier(n_clients + 1)

    def client(k):
        step = step_of(k)
        start.wait()
        outputs[k] = np.stack([step(xs[k, t]) for t in range(steps)])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, outputs


def main(n_clients=64, steps=200, input_size=64, hidden_size=128, max_wait=0.002):
    import rnnfuse
    from threadpoolctl import threadpool_limits

    layer = rnnfuse.LSTM(input_size, hidden_size, seed=0).eval()
    with threadpool_limits(1):
        streams = [layer.stream(1) for _ in range(n_clients)]
        t_streams, want = clients(lambda k: lambda x: streams[k].step(x[None])[0],
                                  n_clients, steps, input_size)
        with MicroBatcher(layer.stream_pool(n_clients), max_wait) as batcher:
            sids = [batcher.open() for _ in range(n_clients)]
            t_batch, got = clients(lambda k: lambda x: batcher.step(sids[k], x),
                                   n_clients, steps, input_size)
    assert all(np.array_equal(g, w) for g, w in zip(got, want)), "outputs differ"
    total = n_clients * steps
    print(f"{n_clients} client threads, {steps} steps each, LSTM({input_size}, "
          f"{hidden_size}), float32, 1 BLAS thread; outputs bitwise equal")
    for name, t in (("a stream per thread", t_streams), ("micro-batcher", t_batch)):
        print(f"{name:20} {total / t:10.0f} session-steps/s")
    print(f"micro-batcher / streams: {t_streams / t_batch:.2f}x the throughput")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="client threads through a MicroBatcher vs "
                                             "each thread owning a stream")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--max-wait", type=float, default=0.002)
    a = ap.parse_args()
    main(a.clients, a.steps, max_wait=a.max_wait)
