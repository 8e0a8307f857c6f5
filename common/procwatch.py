"""Is a process still there? For helpers that must end with the script that started them.

``run.sh`` starts a node's worker supervisor and its ``flwr-clientapp`` launcher in their own
sessions (so a Ctrl-C on the terminal reaches run.sh, which stops them in order). If run.sh itself
is killed (SIGKILL, a power cut of its terminal), its EXIT trap never runs; each helper therefore
watches run.sh's pid (``--parent-pid``) and stops itself when it is gone. Pure standard library.
"""

from __future__ import annotations

import os
from pathlib import Path


def alive(pid: int | None, proc: Path = Path("/proc")) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone); None is always alive."""
    if pid is None:
        return True
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): ask the kernel instead
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")
