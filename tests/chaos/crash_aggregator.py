"""The synthetic aggregator with a crash injected between a checkpoint write and its rename.

Environment: CRASH_BEFORE_REPLACE is the file name whose commit (the os.replace of its
temporary file) kills the process with os._exit(137), like a SIGKILL at that instant;
CRASH_AFTER is how many such commits succeed first. Used by tests/chaos only.
"""

from __future__ import annotations

import os
import sys

from fedsb.aggregator import synthetic

TARGET = os.environ["CRASH_BEFORE_REPLACE"]
survive = int(os.environ.get("CRASH_AFTER", "0"))
real_replace = os.replace


def replace_or_crash(src, dst, **kwargs):  # type: ignore[no-untyped-def]
    global survive
    if os.path.basename(dst) == TARGET:
        if survive == 0:
            os._exit(137)
        survive -= 1
    real_replace(src, dst, **kwargs)


os.replace = replace_or_crash
sys.exit(synthetic.main())
