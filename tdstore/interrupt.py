"""What the command line does on SIGINT and SIGTERM: one line, exit status 130.

Shared by ``tdstore.entry`` (before the command line is imported) and ``tdstore.cli``
(while a command runs); only the standard library is imported here.
"""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED = ("interrupted ({what}): the operation in progress was completed or rolled "
               "back; the store is consistent")


def terminate(signum: int, _frame: object) -> None:
    """A handler that turns SIGTERM into KeyboardInterrupt, as Ctrl-C is."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interrupted(exc: KeyboardInterrupt) -> None:
    """Print the one line for ``exc`` and exit with status 130."""
    sys.stderr.write(INTERRUPTED.format(what=str(exc) or "SIGINT") + "\n")
    sys.stderr.flush()
    # what background threads of other libraries may print while the interpreter
    # shuts down is not for the user: the line above is the message
    try:
        own_stderr = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a test runner's stream
        own_stderr = False
    if own_stderr:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    exit_quietly(130)


def exit_quietly(code: int) -> None:
    """Exit with ``code``; SIGINT and SIGTERM are ignored from here on."""
    # ignored, not blocked: the I/O threads would still take a signal sent to the process
    # (the interpreter resets only handlers that are Python functions, not SIG_IGN)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(code)
