#!/usr/bin/env bash
# The long fuzz run of the functional API: every hypothesis test in tests/test_reliability.py
# with N examples each (default 5000; the default test run uses 40), random seeds.
#   tools/fuzz_long.sh [N]              # with $PYTHON (default .venv/bin/python, else python3)
#   tools/fuzz_long.sh [N] --sanitize   # the same under ASan+UBSan (tools/sanitize.sh)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export RNNFUSE_FUZZ_EXAMPLES=${1:-5000}
args=(tests/test_reliability.py -k fuzz -q --hypothesis-show-statistics -p no:cacheprovider)
if [ "${2:-}" = "--sanitize" ]; then
    exec "$here/sanitize.sh" "${args[@]}"
fi
py=${PYTHON:-$( [ -x "$here/../.venv/bin/python" ] && echo "$here/../.venv/bin/python" || echo python3 )}
cd "$here/.."
exec "$py" -m pytest "${args[@]}"
