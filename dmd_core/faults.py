"""Named fault points, for the fault-injection tests (tests/faults/): a no-op unless DMD_FAULT is set.

``DMD_FAULT=<point>[:<n>[:<how>]]`` makes this process fail the n-th time (default 1st) it reaches
``<point>``: ``kill`` (default) is SIGKILL, as a crash or an OOM kill would be; ``enospc`` raises the
OSError a full disk gives. The points sit where an interruption is most damaging: between a write
and its rename, between a checkpoint's parts, before a manifest.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "DMD_FAULT"
_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, rest = spec.partition(":")
    if point != name:
        return
    nth, _, how = rest.partition(":")
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != int(nth or 1):
        return
    if how == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(fault point {name})")
    os.kill(os.getpid(), signal.SIGKILL)
