#!/usr/bin/env bash
# The test command: set-up, then one pytest run of
#   1. the unit tests of resnode (tests/unit),
#   2. nbval over every chapter notebook (re-executes the book profile, checks the claim cells' outputs),
#   3. a papermill run of every chapter with profile="smoke" at seeds 0-4, every claim asserted,
#   4. resnode.sweep on a tiny notebook (records, failures, resume after a kill),
#   5. the book build from the stored outputs, warnings as errors.
# Tests are spread over one worker per core (pytest-xdist, --dist loadscope: a notebook's cells stay together
# in one kernel, a test file's functions in one worker, the smoke seeds in separate workers);
# RESNODE_TEST_WORKERS overrides the count (0 runs everything in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYDEVD_DISABLE_FILE_VALIDATION=1
exec python3 -m pytest -n "${RESNODE_TEST_WORKERS:-auto}" --dist loadscope tests/unit \
  --nbval-lax --nbval-current-env --nbval-cell-timeout=900 book \
  tests/integration/test_smoke_profiles.py tests/integration/test_sweep.py tests/integration/test_book_build.py "$@"
