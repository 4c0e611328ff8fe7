#!/usr/bin/env python3
"""Concurrency harness: processes x threads writing and reading one store at once.

    python tools/concurrency.py --processes 4 --threads 2 --ops 2000 [--json]

Each thread runs --ops operations on raw and zstd-compressed groups shared by all,
a group of its own, and a group that is deleted and re-created meanwhile; masters are
replaced now and then.
"""

import json
import sys
import tempfile

import click

from tdstore.dev.harness import concurrency_test


@click.command(help=__doc__.splitlines()[0])
@click.option("--processes", default=4, show_default=True, type=click.IntRange(min=1),
              help="Writer processes.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1),
              help="Threads in each process.")
@click.option("--ops", default=2000, show_default=True, type=click.IntRange(min=1),
              help="Operations per thread.")
@click.option("--dir", "workdir", default=None, type=click.Path(file_okay=False),
              help="Where the store goes (default: a new temp dir).")
@click.option("--location", default=None,
              help="The store: an object-store URL such as s3://bucket/prefix (each process "
                   "then plays a host of its own under DIR); default DIR/store.")
@click.option("--url", envvar="TDSTORE_URL", default=None,
              help="Catalogue URL, e.g. postgresql+psycopg://... (default: the store's SQLite).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def main(processes: int, threads: int, ops: int, workdir: str | None,
         location: str | None, url: str | None,
         as_json: bool) -> None:
    root = workdir or tempfile.mkdtemp(prefix="tdstore-concurrency-")
    r = concurrency_test(location or f"{root}/store", processes=processes, threads=threads,
                         ops=ops, url=url, workdir=root)
    click.echo(json.dumps(r, indent=2) if as_json
               else "\n".join(f"{k}: {v}" for k, v in r.items()))
    sys.exit(0 if not r["errors"] and not r["mismatches"] and r["verify_ok"] else 1)


if __name__ == "__main__":
    main()
