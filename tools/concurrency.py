#!/usr/bin/env python3
"""Concurrency harness: processes x threads writing and reading one store at once.

    python tools/concurrency.py --processes 4 --threads 2 --ops 2000 [--json]

Each thread runs --ops operations on raw and zstd-compressed groups shared by all,
a group of its own, and a group that is deleted and re-created meanwhile; masters are
replaced now and then.
"""

import argparse
import json
import sys
import tempfile

from tdstore.dev.harness import concurrency_test


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ops", type=int, default=2000, help="operations per thread")
    p.add_argument("--dir", default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    root = a.dir or tempfile.mkdtemp(prefix="tdstore-concurrency-")
    r = concurrency_test(f"{root}/store", processes=a.processes, threads=a.threads,
                         ops=a.ops)
    print(json.dumps(r, indent=2) if a.json else "\n".join(f"{k}: {v}" for k, v in r.items()))
    return 0 if not r["errors"] and not r["mismatches"] and r["verify_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
