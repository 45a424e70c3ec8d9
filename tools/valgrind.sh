#!/usr/bin/env bash
# valgrind memcheck over every kernel (cell, option, dtype, direction, ragged batch; forward,
# inference and backward) at small sizes, with the installed rnnfuse of $PYTHON. Exits
# non-zero on any memcheck error. tools/valgrind.supp silences the interpreter's own noise.
#   tools/valgrind.sh            (PYTHON defaults to .venv/bin/python, else python3)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-$( [ -x "$here/../.venv/bin/python" ] && echo "$here/../.venv/bin/python" || echo python3 )}
cd "$(mktemp -d)"   # import the installed package, not a source tree
OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 PYTHONMALLOC=malloc \
valgrind --tool=memcheck --error-exitcode=99 --vex-guest-max-insns=25 --leak-check=no --track-origins=yes \
    --suppressions="$here/valgrind.supp" --gen-suppressions=${GEN_SUPP:-no} -q \
    "$py" - <<'PY'
import numpy as np
from rnnfuse import functional as F, reference as R
G = {"lstm": 4, "gru": 3, "rnn": 1}
n = 0
for cell, opt in [("lstm", None), ("gru", True), ("gru", False), ("rnn", "tanh"), ("rnn", "relu")]:
    for dtype in (np.float32, np.float64):
        for rev in (False, True):
            for T, B, I, H, lengths in [(3, 2, 3, 5, None), (5, 7, 2, 17, [5, 0, 3, 5, 1, 2, 4])]:
                rng = np.random.default_rng(n)
                r = lambda *s: (rng.standard_normal(s) / 3).astype(dtype)
                x, h0, c0 = r(T, B, I), r(B, H), r(B, H)
                w = (r(G[cell] * H, I), r(G[cell] * H, H), r(G[cell] * H), r(G[cell] * H))
                dy, dh, dc = r(T, B, H), r(B, H), r(B, H)
                kw = dict(lengths=lengths, reverse=rev)
                if cell == "gru": kw["linear_before_reset"] = opt
                if cell == "rnn": kw["nonlinearity"] = opt
                for M in (F, R):
                    if cell == "lstm":
                        *o, ctx = M.lstm_forward(x, h0, c0, *w, **kw)
                        M.lstm_forward(x, h0, c0, *w, **kw, need_ctx=False)
                        g = M.lstm_backward(dy, dh, dc, ctx)
                    else:
                        *o, ctx = getattr(M, cell + "_forward")(x, h0, *w, **kw)
                        getattr(M, cell + "_forward")(x, h0, *w, **kw, need_ctx=False)
                        g = getattr(M, cell + "_backward")(dy, dh, ctx)
                    if M is F:
                        got = (o, g)
                tol = 1e-4 if dtype == np.float32 else 1e-9
                for a, b in zip(list(got[0]) + list(got[1]), list(o) + list(g)):
                    if a is not None and not np.allclose(a, b, rtol=tol, atol=tol):
                        raise SystemExit(f"mismatch: {cell} {opt} {dtype} {rev}")
                n += 1
print(f"valgrind subset: {n} kernel configurations, forward/inference/backward each")
PY
