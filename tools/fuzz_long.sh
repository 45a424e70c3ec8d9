#!/usr/bin/env bash
# The long fuzz run: every hypothesis test of the functional API (tests/test_reliability.py),
# the layers (tests/test_fuzz_layers.py), the training pieces (tests/test_fuzz_training.py) and the commands (tests/test_fuzz_cli.py)
# with N examples each (default 5000; the default test run uses 40), random seeds.
#   tools/fuzz_long.sh [N]              # with $PYTHON (default .venv/bin/python, else python3)
#   tools/fuzz_long.sh [N] --sanitize   # the same under ASan+UBSan (tools/sanitize.sh)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export RNNFUSE_FUZZ_EXAMPLES=${1:-5000}
args=(tests/test_reliability.py tests/test_fuzz_layers.py tests/test_fuzz_training.py
      tests/test_fuzz_cli.py
      -k fuzz -q --hypothesis-show-statistics -p no:cacheprovider)
if [ "${2:-}" = "--sanitize" ]; then
    exec "$here/sanitize.sh" "${args[@]}"
fi
py=${PYTHON:-$( [ -x "$here/../.venv/bin/python" ] && echo "$here/../.venv/bin/python" || echo python3 )}
cd "$here/.."
exec "$py" -m pytest "${args[@]}"
