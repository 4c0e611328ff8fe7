#!/usr/bin/env python3
"""Crash harness: stop a writer by a signal at random moments, check the store each time.

    python tools/crash.py --kills 500 [--signals KILL,TERM,INT] [--dir DIR] [--seed S] [--json]
"""

import json
import signal
import sys
import tempfile

import click

from tdstore.dev.harness import crash_test


def _signals(text: str) -> tuple[signal.Signals, ...]:
    try:
        return tuple(signal.Signals[f"SIG{name.strip().upper()}"] for name in text.split(","))
    except KeyError as exc:
        raise click.BadParameter(f"unknown signal {exc.args[0]}; expected KILL, TERM or INT",
                                 param_hint="--signals") from None


@click.command(help=__doc__.splitlines()[0])
@click.option("--kills", default=500, show_default=True, type=click.IntRange(min=1),
              help="How many times the writer is stopped.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random moments.")
@click.option("--dir", "workdir", default=None, type=click.Path(file_okay=False),
              help="Where the store goes (default: a new temp dir).")
@click.option("--signals", "names", default="KILL", show_default=True,
              help="Comma-separated signals to stop the writer with (KILL, TERM, INT).")
@click.option("--location", default=None,
              help="The store: an object-store URL such as s3://bucket/prefix (each process "
                   "then plays a host of its own under DIR); default DIR/store.")
@click.option("--url", envvar="TDSTORE_URL", default=None,
              help="Catalogue URL, e.g. postgresql+psycopg://... (default: the store's SQLite).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def main(kills: int, seed: int, workdir: str | None, names: str, location: str | None,
         url: str | None,
         as_json: bool) -> None:
    sigs = _signals(names)
    root = workdir or tempfile.mkdtemp(prefix="tdstore-crash-")

    def progress(done: int, total: int, what: str) -> None:
        if done % 25 == 0 or done == total:
            click.echo(f"{done}/{total} kills, {what}", err=True)

    report = crash_test(location or f"{root}/store", kills, seed=seed, signals=sigs,
                        progress=progress, url=url, workdir=root)
    data = report.to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            click.echo(f"{key}: {value}")
        click.echo(f"lost: {report.lost}")
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
