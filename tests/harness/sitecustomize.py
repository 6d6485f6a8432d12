"""Run at the start of every Python process of the test suite (tests/conftest.py puts this folder first on
PYTHONPATH): with SUITE_WITHOUT_BITSANDBYTES=1 the process runs as in an environment without bitsandbytes.

diffusers imports bitsandbytes whenever it is installed (for its quantizers), and bitsandbytes imports torch's
inductor: about 3.5 s of CPU per process on this project's 2-core machine, most of a one-line-error test and a
fifth of a short training run. No script needs it unless --use_8bit_adam is given, and the tests that give it start
their run with SUITE_WITHOUT_BITSANDBYTES=0 (kit.launch(..., bitsandbytes=True)).
"""

import os
import sys


if os.environ.get("SUITE_WITHOUT_BITSANDBYTES") == "1":
    sys.modules.setdefault("bitsandbytes", None)  # importlib.util.find_spec then answers None, as if not installed
