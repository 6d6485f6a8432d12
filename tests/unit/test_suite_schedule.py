"""The suite's schedule does what tests/README.md says: tests that share an expensive module-scoped fixture run on one
worker, so the fixture (a training run, a generated sample set) is made once, not once per worker.

conftest.py marks such tests with `xdist_group` and tests/run_tests.sh runs `--dist loadgroup`. pytest 9.2 broke that
silently (its structured node ids ignore the group suffix pytest-xdist 3.8 writes, pytest-xdist#1386): every test
went out alone, and a module's fixture was built on each of the three workers, minutes of the suite. This test runs
a small suite of its own the same way and checks where its tests ran.
"""

import subprocess
import sys


PROBE = """
import os
import pytest


@pytest.fixture(scope="module")
def made_once():
    with open({log!r}, "a") as log:
        log.write("{name} " + os.environ["PYTEST_XDIST_WORKER"] + "\\n")


@pytest.mark.xdist_group("{name}")
@pytest.mark.parametrize("i", range(4))
def test_probe(made_once, i):
    pass
"""


def test_tests_of_one_xdist_group_run_on_one_worker_and_share_its_module_fixture(tmp_path):
    log = tmp_path / "setups.log"
    for name in ("first", "second", "third"):
        (tmp_path / f"test_{name}.py").write_text(PROBE.format(log=str(log), name=name))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "3", "--dist", "loadgroup", "--no-loadscope-reorder"]
        + ["-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "12 passed" in result.stdout, result.stdout[-3000:]
    setups = sorted(line.split()[0] for line in log.read_text().splitlines())
    assert setups == ["first", "second", "third"], f"module fixtures set up per worker, not per group: {setups}"


def test_every_pytest_process_computes_on_one_torch_thread():
    # conftest.py sets OMP_NUM_THREADS=1 before torch loads: three workers on two cores with two threads each spent
    # more CPU in OpenMP threads spinning for a core than on the tiny models' work. A torch imported before conftest
    # runs (a plugin, a new import at the top of kit.py) would take the machine's core count and undo it.
    import torch

    assert torch.get_num_threads() == 1
