#!/usr/bin/env bash
# Build rnnfuse with AddressSanitizer + UndefinedBehaviorSanitizer in a throwaway copy and
# venv (the normal build is never touched) and run tests under it. Exits non-zero if a test
# fails or the sanitizers report anything (reports are also printed).
#
#   tools/sanitize.sh                     # the subset that covers every kernel and option
#   tools/sanitize.sh tests/ -x           # any pytest arguments instead
#   RNNFUSE_FUZZ_EXAMPLES=2000 tools/sanitize.sh tests/test_reliability.py -k fuzz
#
# Environment: PYTHON (default python3), CC (default gcc), RNNFUSE_KEEP=1 keeps the work dir.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
cc=${CC:-gcc}
work=$(mktemp -d "${TMPDIR:-/tmp}/rnnfuse-sanitize.XXXXXX")
if [ "${RNNFUSE_KEEP:-0}" != 1 ]; then trap 'rm -rf "$work"' EXIT; fi
start=$SECONDS

# 1. A copy of the working tree (tracked and untracked, not ignored files): the in-tree
#    build of pip writes build/ and _kernels.c, which must not land in the real checkout.
mkdir -p "$work/src" "$work/logs"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard |
    tar --null --ignore-failed-read -T - -cf -) | tar -xf - -C "$work/src"

# 2. A venv with the build and test requirements, and the sanitized, non-editable build.
"$py" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" 'setuptools>=77' 'Cython>=3.0' 'numpy>=2.0' 'scipy>=1.11' 'threadpoolctl>=3.1' \
    'pytest>=7' 'hypothesis>=6'
CC="$cc" RNNFUSE_SANITIZE=1 "${pip[@]}" --no-build-isolation "$work/src"
echo "sanitize.sh: built in $((SECONDS - start)) s" >&2

# 3. The tests, with the sanitizer runtime preloaded into the (unsanitized) interpreter.
#    Every kernel, cell, option, dtype, direction and batch kind is in this default subset,
#    the C-level API (test_capi.py builds its example with the unsanitized compiler), the
#    streams and the stream pools;
#    then the kernels again on the portable code path (RNNFUSE_KERNEL=portable): every
#    cell, option, dtype and batch kind against the reference, the tile edges and the
#    shared time loops (the long bitwise comparisons run on it in CI without sanitizers).
asan=$("$cc" -print-file-name=libasan.so)
# --capture=sys: reports are written to fd 2 by C; pytest's fd capture would swallow them
# when the process halts. (UBSan ignores log_path inside the ASan runtime: scan the output.)
rc=0
run_tests() {  # run_tests KERNEL PYTEST_ARGS... (KERNEL "": the best this CPU runs)
    local kernel=$1
    shift
    (cd "$work/src" &&
     RNNFUSE_KERNEL=$kernel LD_PRELOAD="$asan" PYTHONMALLOC=malloc \
     ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1" \
     UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1" \
     "$work/venv/bin/python" -m pytest -p no:cacheprovider --capture=sys "$@") \
        2>&1 | tee -a "$work/logs/pytest.log" || rc=$?
}
if [ $# -eq 0 ]; then
    run_tests "" tests/test_functional.py tests/test_reliability.py tests/test_vmath.py \
        tests/test_capi.py tests/test_stream.py tests/test_pool.py tests/test_proj.py \
        tests/test_layer_norm.py tests/test_quantized.py -q
    run_tests portable tests/test_functional.py -q \
        -k "matches_reference or register_tile_edges or numbers_of_one"
else
    run_tests "${RNNFUSE_KERNEL:-}" "$@"
fi
if grep -qE "runtime error:|ERROR: AddressSanitizer|ERROR: LeakSanitizer|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$work/logs/pytest.log"; then
    echo "sanitize.sh: SANITIZER REPORT (see above; pytest exit $rc)" >&2
    exit 1
fi
echo "sanitize.sh: pytest exit $rc, no sanitizer reports, $((SECONDS - start)) s in all" >&2
exit "$rc"
