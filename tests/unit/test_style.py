"""The code reads as the project's style asks: `ruff check` and `ruff format` at 119 columns (pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

import pytest
from kit import REPO


RUFF = Path(sys.executable).parent / "ruff"


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_the_repository_is_ruff_clean(command):
    result = subprocess.run([str(RUFF), *command, "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
