"""One step of rnnfuse.torch's LSTMCell, GRUCell and RNNCell against torch.nn's, at B=1 and
B=16, I=H=128, float32, 1 thread: inference (no_grad) and a training step (forward,
backward, SGD step), and rnnfuse.torch with the weights packed anew at every call (as
before the cells kept their pack). Interleaved rounds (the order reversed every other
round), median microseconds per call.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/torch_cells.py [ROUNDS]
"""
import statistics
import sys
import time

import torch
from threadpoolctl import threadpool_limits

import rnnfuse.torch as rt
from rnnfuse.torch import _modules

I = H = 128
CALLS = 300
CELLS = (("LSTMCell", rt.LSTMCell, torch.nn.LSTMCell), ("GRUCell", rt.GRUCell, torch.nn.GRUCell),
         ("RNNCell", rt.RNNCell, torch.nn.RNNCell))


def timed(fn):
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    return (time.perf_counter() - start) / CALLS * 1e6


def inference(module, x):
    def run():
        with torch.no_grad():
            module(x)
    return run


def training(module, x):
    opt = torch.optim.SGD(module.parameters(), lr=1e-6)

    def run():
        opt.zero_grad()
        out = module(x)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        opt.step()
    return run


def packing_every_call(run):
    def again():
        kept, _modules._packed = _modules._packed, lambda *args: None
        try:
            run()
        finally:
            _modules._packed = kept
    return again


def main(rounds):
    threadpool_limits(1)
    torch.set_num_threads(1)
    for name, ours_class, torch_class in CELLS:
        for B in (1, 16):
            torch.manual_seed(0)
            ours, ref = ours_class(I, H), torch_class(I, H)
            ref.load_state_dict(ours.state_dict())
            x = torch.randn(B, I)
            torch.testing.assert_close(ours(x), ref(x))
            for mode, make in (("inference", inference), ("training", training)):
                runs = {"rnnfuse": make(ours, x), "torch.nn": make(ref, x),
                        "packing every call": packing_every_call(make(ours, x))}
                times = {k: [] for k in runs}
                for r in range(rounds):
                    for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                        times[k].append(timed(runs[k]))
                ours_us, torch_us, unpacked_us = (statistics.median(times[k]) for k in runs)
                print(f"{name:8s} B={B:<2d} {mode:9s} rnnfuse {ours_us:7.1f}  torch.nn "
                      f"{torch_us:7.1f}  packing every call {unpacked_us:7.1f} us   "
                      f"torch.nn/rnnfuse {torch_us / ours_us:4.2f}  "
                      f"packing every call/rnnfuse {unpacked_us / ours_us:4.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9)
