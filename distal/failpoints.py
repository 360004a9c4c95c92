"""Named crash points for tests: ``DISTAL_FAILPOINT=NAME`` kills the job there.

The crash is a SIGKILL of the whole process group (the driver and the local
Ray it started), the same as a lost machine, so tests can check that a rerun
resumes correctly. Unset in normal use, where ``hit`` does nothing.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "DISTAL_FAILPOINT"


def hit(name: str) -> None:
    """Kill this process group when ``DISTAL_FAILPOINT`` equals ``name``."""
    if os.environ.get(ENVIRONMENT_VARIABLE) == name:
        log.warning("stage=failpoint name=%s action=kill", name)
        logging.shutdown()
        os.killpg(os.getpgid(0), signal.SIGKILL)
