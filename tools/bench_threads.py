"""rnnfuse at 1 and 2 BLAS threads on the benchmark grid (float32): medians of rounds that
alternate the thread count, set between rounds and never inside a timed call.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python tools/bench_threads.py [cells] [rounds]
"""
import statistics
import sys
import time

from threadpoolctl import threadpool_limits

from rnnfuse import bench


def main(cells=("lstm", "gru", "rnn"), rounds=7, threads=(1, 2)):
    for case in bench.cases(bench.GRID, cells=cells, dtypes=("float32",)):
        fn = bench.runner("rnnfuse", case)
        reps = max(1, int(0.05 / bench.time_once(fn)))  # each sample about 50 ms
        samples = {n: [] for n in threads}
        for r in range(rounds):
            for n in (threads if r % 2 == 0 else threads[::-1]):
                with threadpool_limits(n):
                    fn()
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    samples[n].append((time.perf_counter() - t0) / reps)
        m = {n: statistics.median(s) for n, s in samples.items()}
        a, b = threads
        s = case.shape
        shape = f"{s.T}x{s.B}x{s.I}x{s.H}" + (" ragged" if s.ragged else "")
        print(f"{case.cell:4} {case.mode:9} {shape:22}"
              f" {a} thread(s) {m[a] * 1e3:9.3f} ms  {b} threads {m[b] * 1e3:9.3f} ms"
              f"  speedup {m[a] / m[b]:.2f}x", flush=True)


if __name__ == "__main__":
    main(tuple(sys.argv[1].split(",")) if len(sys.argv) > 1 else ("lstm", "gru", "rnn"),
         int(sys.argv[2]) if len(sys.argv) > 2 else 7)
