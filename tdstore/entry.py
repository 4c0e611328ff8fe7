"""The ``tdstore`` executable: the command line (``tdstore.cli``) with SIGINT and SIGTERM
turned into one line and exit status 130 from the moment this module runs.

It imports nothing but the standard library before its handlers are in place, so a
signal while the library is still being imported is handled too. Once the command has
finished, SIGINT and SIGTERM are ignored: the interpreter resets signal handlers while
it shuts down, and a signal then would kill a process whose work is done.
"""

from __future__ import annotations

import signal
import sys

from tdstore.interrupt import exit_quietly, interrupted, terminate


def run() -> None:
    """Run the command line named by ``sys.argv``."""
    signal.signal(signal.SIGTERM, terminate)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        from tdstore.cli import main

        main()
    except KeyboardInterrupt as exc:
        interrupted(exc)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            sys.stderr.write(f"{exc.code}\n")
        exit_quietly(code)
    exit_quietly(0)
