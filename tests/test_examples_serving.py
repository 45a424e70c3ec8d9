"""examples/serving/microbatch.py: threads stepping sessions through the micro-batcher get
bitwise each session's own stream's outputs; bad calls fail alone, with clear errors."""
import importlib.util
import pathlib
import threading
import time

import numpy as np
import pytest

import rnnfuse

PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "serving" / "microbatch.py"
if not PATH.exists():
    pytest.skip("examples/ is not beside the tests (installed copy)", allow_module_level=True)
spec = importlib.util.spec_from_file_location("microbatch", PATH)
microbatch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(microbatch)
MicroBatcher = microbatch.MicroBatcher


@pytest.fixture
def layer():
    return rnnfuse.LSTM(5, 7, num_layers=2, seed=1).eval()


@pytest.mark.parametrize("max_wait", [0.0, 0.002])
def test_threads_through_the_batcher_match_their_own_streams(layer, max_wait):
    n, steps = 12, 15
    streams = [layer.stream(1) for _ in range(n)]
    _, want = microbatch.clients(lambda k: lambda x: streams[k].step(x[None])[0],
                                 n, steps, layer.input_size)
    with MicroBatcher(layer.stream_pool(n), max_wait) as batcher:
        sids = [batcher.open() for _ in range(n)]
        _, got = microbatch.clients(lambda k: lambda x: batcher.step(sids[k], x),
                                    n, steps, layer.input_size)
        for k, sid in enumerate(sids):
            h, c = batcher.state(sid)
            assert np.array_equal(h, streams[k].state[0])
            assert np.array_equal(c, streams[k].state[1])
    for g, w in zip(got, want):
        assert g.shape == (steps, layer.hidden_size) and np.array_equal(g, w)


def test_sessions_open_and_close_while_others_step(layer):
    with MicroBatcher(layer.stream_pool(4), max_wait=0.001) as batcher:
        x = np.ones(layer.input_size, np.float32)
        errors = []

        def churn():  # sessions that come and go beside a steady one
            try:
                for _ in range(20):
                    sid = batcher.open()
                    batcher.step(sid, x)
                    batcher.close(sid)
            except Exception as e:  # pragma: no cover (reported below)
                errors.append(e)

        steady = batcher.open()
        threads = [threading.Thread(target=churn) for _ in range(3)]
        for t in threads:
            t.start()
        ys = [batcher.step(steady, x) for _ in range(20)]
        for t in threads:
            t.join()
        assert not errors
        stream = layer.stream(1)
        assert np.array_equal(np.stack(ys), np.stack([stream.step(x[None])[0]
                                                      for _ in range(20)]))


def test_bad_calls_fail_alone_with_clear_errors(layer):
    with MicroBatcher(layer.stream_pool(2)) as batcher:
        sid = batcher.open()
        x = np.zeros(layer.input_size, np.float32)
        with pytest.raises(TypeError, match=r"x must have dtype float32"):
            batcher.step(sid, x.astype(np.float64))
        with pytest.raises(ValueError, match=r"x must have shape \(5,\)"):
            batcher.step(sid, x[None])
        with pytest.raises(ValueError, match="sid: 12345 is not an open session"):
            batcher.step(12345, x)
        batcher.close(sid)
        with pytest.raises(ValueError, match="is not an open session"):
            batcher.step(sid, x)
        other = batcher.open()
        assert batcher.step(other, x).shape == (layer.hidden_size,)
    with pytest.raises(RuntimeError, match="the batcher is closed"):
        batcher.step(other, x)
    with pytest.raises(TypeError, match="pool must be a stream pool"):
        MicroBatcher(layer)
    with pytest.raises(ValueError, match="max_wait must be seconds >= 0"):
        MicroBatcher(layer.stream_pool(1), max_wait=-1)


def test_a_second_step_of_one_session_in_flight_is_refused(layer):
    with MicroBatcher(layer.stream_pool(2), max_wait=0.5) as batcher:
        a, _ = batcher.open(), batcher.open()  # b never steps: a's batch waits
        x = np.zeros(layer.input_size, np.float32)
        t = threading.Thread(target=batcher.step, args=(a, x))
        t.start()
        deadline = time.monotonic() + 10
        while not batcher._busy and time.monotonic() < deadline:
            time.sleep(0.001)
        with pytest.raises(RuntimeError, match="has a step in flight"):
            batcher.step(a, x)
        with pytest.raises(RuntimeError, match="has a step in flight"):
            batcher.close(a)
    t.join()
