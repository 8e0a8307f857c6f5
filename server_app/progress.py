"""A copy of the ServerApp's output in a file that ``run.sh`` follows instead of Flower's log stream.

``flwr run --stream`` keeps a Python process (the Flower CLI) alive for the whole run only to print
the ServerApp's output: about 80 MB of memory (PSS) and 10 CPU seconds per 20-round simulation
(``BENCHMARKS.md``). In a quiet simulation ``run.sh`` instead submits the run, sets
:data:`PROGRESS_ENV` to a file in its session folder (the SuperLink, SuperExec and ``flwr-simulation``
inherit it) and prints that file as it grows (``tail -F``). While :func:`tee_output` is active,
everything the ServerApp writes to stdout/stderr (progress lines, warnings, Flower's errors) goes
both to Flower's capture, as before, and to the file; a failure of the ServerApp is written there
in one line (exception type and message) before it propagates (``run.sh`` then prints Flower's full
log of the run, traceback included).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from typing import IO, TextIO

PROGRESS_ENV = "PROGFL_PROGRESS_FILE"


class _Tee:
    """A text stream that writes to ``primary`` and to ``copy`` (the copy is flushed every write)."""

    def __init__(self, primary: TextIO, copy: IO[str]) -> None:
        self._primary = primary
        self._copy = copy

    def write(self, text: str) -> int:
        n = self._primary.write(text)
        with contextlib.suppress(OSError, ValueError):
            self._copy.write(text)
            self._copy.flush()
        return n

    def flush(self) -> None:
        self._primary.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> object:
        return getattr(self._primary, name)


@contextlib.contextmanager
def tee_output(path: str | None = None) -> Iterator[None]:
    """Copy stdout and stderr into ``path`` (default: ``$PROGFL_PROGRESS_FILE``; unset: no copy).

    The file is opened for appending; an exception leaving the block is written to it (type and
    message) and re-raised. Streams are restored on exit.
    """
    path = path if path is not None else os.environ.get(PROGRESS_ENV) or None
    if not path:
        yield
        return
    with open(path, "a", encoding="utf-8", buffering=1) as copy:
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(old_out, copy), _Tee(old_err, copy)  # type: ignore[assignment]
        try:
            yield
        except BaseException as exc:
            with contextlib.suppress(OSError, ValueError):
                reason = "".join(traceback.format_exception_only(exc)).strip()
                copy.write(f"[progfl] the ServerApp failed: {reason}\n")
                copy.flush()
            raise
        finally:
            sys.stdout, sys.stderr = old_out, old_err
