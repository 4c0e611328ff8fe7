#!/usr/bin/env python3
"""Crash harness: stop a writer by a signal at random moments, check the store each time.

    python tools/crash.py --kills 500 [--signals KILL,TERM,INT] [--dir DIR] [--seed S] [--json]
"""

import argparse
import json
import signal
import sys
import tempfile

from tdstore.dev.harness import crash_test


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="where the store goes (default: a temp dir)")
    p.add_argument("--signals", default="KILL",
                   help="comma-separated signals to stop the writer with (KILL, TERM, INT)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    root = a.dir or tempfile.mkdtemp(prefix="tdstore-crash-")

    def progress(done: int, total: int, what: str) -> None:
        if done % 25 == 0 or done == total:
            print(f"{done}/{total} kills, {what}", file=sys.stderr, flush=True)

    sigs = tuple(signal.Signals[f"SIG{name.strip().upper()}"] for name in a.signals.split(","))
    report = crash_test(f"{root}/store", a.kills, seed=a.seed, signals=sigs, progress=progress)
    data = report.to_dict()
    if a.json:
        print(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            print(f"{key}: {value}")
        print(f"lost: {report.lost}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
