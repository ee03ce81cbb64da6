#!/bin/sh
# Run shmalloc's core tests with the native core built under AddressSanitizer
# (and UndefinedBehaviorSanitizer), or under valgrind's memcheck.
#
#   scripts/asan.sh                      ASan+UBSan: core, adoption, releaser, hostile and stress tests
#   scripts/asan.sh tests/unit/test_core.py   ASan+UBSan: the tests given
#   scripts/asan.sh --selftest           prove the instrumentation is live: an
#                                        overflow through the core must be caught
#   scripts/asan.sh --valgrind [tests]   memcheck on the installed build (slow)
#
# The sanitized build goes to a scratch copy of the package, so the installed
# (editable) build that other processes use is never replaced. Exit status:
# pytest's, or non-zero as soon as a sanitizer reports an error.
set -eu

repo=$(cd "$(dirname "$0")/.." && pwd)
# The interpreter itself, not a wrapper script (pyenv's shim would hide it from valgrind).
python=$("${PYTHON:-python}" -c 'import sys; print(sys.executable)')
default_tests="tests/unit/test_core.py tests/unit/test_adoption.py tests/unit/test_releaser.py tests/system/test_hostile.py tests/system/test_stress.py"

mode=asan
case "${1:-}" in
    --selftest) mode=selftest; shift ;;
    --valgrind) mode=valgrind; shift ;;
esac
tests=${*:-$default_tests}

if [ "$mode" = valgrind ]; then
    cd "$repo"
    # PYTHONMALLOC=malloc: pymalloc's arenas confuse memcheck. Only errors whose
    # stack passes through the native core count (see docs/sanitizers.md).
    log=$(mktemp)
    SHMALLOC_SANITIZER=valgrind PYTHONMALLOC=malloc valgrind --tool=memcheck --error-exitcode=0 --trace-children=no \
        --num-callers=30 --log-file="$log" \
        "$python" -m pytest -q -p no:cacheprovider $tests || status=$?
    if grep -B2 -A30 "^==[0-9]*== \(Invalid\|Conditional\|Syscall param\|Mismatched\|Source and destination\)" "$log" \
        | grep -q "shmalloc_core\|_native"; then
        echo "valgrind: errors in shmalloc's native core, see $log" >&2
        exit 1
    fi
    echo "valgrind: no errors in shmalloc's native core (full log: $log)"
    exit "${status:-0}"
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/src"
cp -r "$repo/src/shmalloc" "$scratch/src/"
cp "$repo/build_ffi.py" "$repo/setup.py" "$repo/pyproject.toml" "$scratch/"
[ -f "$repo/README.md" ] && cp "$repo/README.md" "$scratch/"
rm -f "$scratch"/src/shmalloc/_native*.so "$scratch"/src/shmalloc/_native.c

flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g -O1"
(cd "$scratch" && CFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined" \
    "$python" setup.py -q build_ext --inplace >"$scratch/build.log" 2>&1) || {
    cat "$scratch/build.log" >&2
    exit 1
}

libasan=$(gcc -print-file-name=libasan.so)
libubsan=$(gcc -print-file-name=libubsan.so)
# detect_leaks=0: CPython keeps much alive until exit, by design. Errors abort
# with a distinct status so pytest cannot swallow them.
export LD_PRELOAD="$libasan $libubsan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=86:halt_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87"
export PYTHONMALLOC=malloc  # let ASan see every Python allocation too
export SHMALLOC_SANITIZER=asan  # tests that measure RSS skip that part: ASan's quarantine holds freed memory
export PYTHONPATH="$scratch/src${PYTHONPATH:+:$PYTHONPATH}"

# From the scratch copy (its src/ comes first on sys.path), so
# that the sanitized build, not the installed one, is what gets imported.
cd "$scratch"
"$python" -c "
import sys, shmalloc._native as n
assert n.__file__.startswith('$scratch'), n.__file__
print('sanitized core:', n.__file__)
"

if [ "$mode" = selftest ]; then
    # A heap overflow through shmalloc_copy: ASan must stop the process.
    if "$python" -c "
from shmalloc._native import ffi, lib
dst = ffi.new('char[]', 16)
src = ffi.new('char[]', 64)
lib.shmalloc_copy(dst, src, 64, 1)
print('not caught')
" 2>"$scratch/selftest.log"; then
        echo "selftest FAILED: the overflow was not caught" >&2
        exit 1
    fi
    if grep -q "AddressSanitizer: heap-buffer-overflow" "$scratch/selftest.log"; then
        echo "selftest ok: AddressSanitizer caught a heap-buffer-overflow in the core"
        exit 0
    fi
    cat "$scratch/selftest.log" >&2
    exit 1
fi

paths=""
for t in $tests; do
    case "$t" in /*) paths="$paths $t" ;; *) paths="$paths $repo/$t" ;; esac
done
"$python" -m pytest -q -p no:cacheprovider $paths
