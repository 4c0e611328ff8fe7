"""The ``tdstore`` command line: each command is a thin layer over the library."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .errors import TdStoreError

MiB = 1 << 20


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


class _Group(click.Group):
    """Turns tdstore's errors into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context):  # noqa: ANN201
        try:
            return super().invoke(ctx)
        except TdStoreError as exc:
            _fail(exc)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="tdstore")
def main() -> None:
    """tdstore: persistent master/mirror storage for the KV caches of many LLM agents."""


@main.command()
@click.argument("path", default="tdstore-demo", type=click.Path(path_type=Path))
@click.option("--agents", default=8, show_default=True, help="Agents in the group.")
@click.option("--blocks", default=256, show_default=True, help="Blocks per agent.")
@click.option("--tail", default=8, show_default=True, help="Tail blocks where agents differ.")
def demo(path: Path, agents: int, blocks: int, tail: int) -> None:
    """Write a synthetic group of agents to PATH, re-read it in a fresh process."""
    from .demo import DemoWorkload, run

    work = DemoWorkload(n_agents=agents, n_blocks=blocks, tail_blocks=tail)
    click.echo(
        f"tdstore demo: store {path}/, group 'demo': {work.n_agents} agents x "
        f"{work.n_blocks} blocks of {work.block_shape} {work.dtype} "
        f"({work.agent_nbytes / MiB:.1f} MiB each), differing in their last "
        f"{work.tail_blocks} blocks"
    )
    r = run(path, work)
    n = work.n_agents
    logical = n * work.agent_nbytes
    stats = r["stats"]
    click.echo(
        f"write:  master {work.agent_nbytes / MiB:.1f} MiB in {r['master_s']:.3f} s "
        f"({work.agent_nbytes / r['master_s'] / 1e9:.2f} GB/s, fsynced); "
        f"{n - 1} mirrors in {r['mirrors_s']:.3f} s "
        f"({(n - 1) * work.agent_nbytes / r['mirrors_s'] / 1e9:.2f} GB/s of agent data)"
    )
    ok = sum(r["exact"])
    click.echo(
        f"read:   a fresh process reconstructed {n} agents ({logical / MiB:.0f} MiB) in "
        f"{r['read_s']:.3f} s ({logical / r['read_s'] / 1e9:.2f} GB/s); "
        f"bit-exact: {ok}/{n}"
    )
    click.echo(
        f"space:  logical {logical / MiB:.1f} MiB, stored {stats['bytes_stored'] / MiB:.1f} MiB, "
        f"store directory {r['disk_bytes'] / MiB:.1f} MiB; compression ratio "
        f"{stats['compression_ratio']:.2f}x (blocks), {logical / r['disk_bytes']:.2f}x (bytes)"
    )
    if ok != n:
        raise click.ClickException("some agents did not reconstruct bit-exactly")


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Benchmark tdstore against np.save/np.load, safetensors, diskcache and memcpy.

    Options: see `tdstore bench --help`.
    """
    from .bench import main as bench_main

    sys.exit(bench_main(list(args)))


if __name__ == "__main__":
    main()
