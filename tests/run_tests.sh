#!/usr/bin/env bash
# README command 2: set up .venv (examples/setup_env.sh) and run the whole test suite on the CPU with three
# pytest-xdist workers (a module's tests stay on one worker, so its module-scoped runs are shared; three keep two
# cores busy while a worker waits on a subprocess that starts or a fixture another worker builds), then print the
# 25 slowest tests. Extra arguments go to pytest, e.g. `-m "not slow"` for the fast tier; PYTEST_WORKERS=N sets
# the number of workers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash examples/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
exec .venv/bin/python -m pytest tests -n "${PYTEST_WORKERS:-3}" --dist loadgroup --no-loadscope-reorder --durations=25 "$@"
