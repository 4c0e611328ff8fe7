"""The ``tdstore`` command line: each command is a thin layer over one library call.

Read commands take ``--json`` (always valid JSON: a value that is not a finite number
is ``null``); long operations show a progress bar on a terminal and stay quiet
otherwise; user errors print one line on stderr and exit with status 2; Ctrl-C (or
SIGTERM) prints one line and exits with status 130, at any moment, startup included.
The library is imported only once a command runs.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tdstore import interrupt
from tdstore.core.errors import InvalidInputError, TdStoreError, name_list
from tdstore.core.version import __version__

if TYPE_CHECKING:
    from tdstore.api.store import Store

MiB = 1 << 20
MAX_COUNT = 2**31 - 1  # counts and sizes on the command line


def _printable(text: str) -> str:
    """``text`` on one line: control characters (newlines, escape sequences) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _fail(exc: BaseException) -> None:
    click.echo(f"error: {_printable(str(exc))}", err=True)
    sys.exit(2)


class _Group(click.Group):
    """Turns tdstore's errors into one line on stderr and exit status 2, and SIGINT or
    SIGTERM into one line and exit status 130: the write in progress has then either
    committed or been rolled back (the library holds signals back during a commit)."""

    def invoke(self, ctx: click.Context) -> Any:
        previous = signal.signal(signal.SIGTERM, interrupt.terminate)
        try:
            return super().invoke(ctx)
        except TdStoreError as exc:
            _fail(exc)
        except BrokenPipeError:  # the reader went away (`tdstore ls S | head`): be quiet
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except (OSError, EOFError) as exc:  # a file the command was given cannot be used
            _fail(exc)
        except KeyboardInterrupt as exc:
            interrupt.interrupted(exc)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own: usage errors and exits
        except Exception as exc:  # a bug: still one line (TDSTORE_DEBUG=1 shows it all)
            if os.environ.get("TDSTORE_DEBUG"):
                raise
            click.echo(f"error: {_printable(f'{type(exc).__name__}: {exc}')} (an internal "
                       "error: set TDSTORE_DEBUG=1 for the traceback)", err=True)
            sys.exit(1)
        finally:
            signal.signal(signal.SIGTERM, previous)


def _catalog_url() -> str | None:
    """``--url`` (or ``TDSTORE_URL``) of the command being run, if any."""
    ctx = click.get_current_context(silent=True)
    url: str | None = ctx.meta.get("tdstore_url") if ctx is not None else None
    return url or None


def _open(path: Path, *, create: bool = False, reads_only: bool = False,
          **kwargs: Any) -> Store:
    """The store at ``path``; a command that only reads (``reads_only``) opens a store
    in a directory this process cannot write read-only instead of refusing it."""
    from tdstore.api.store import open as open_store
    from tdstore.core.errors import ReadOnlyError

    try:
        return open_store(path, url=_catalog_url(), create=create, **kwargs)
    except ReadOnlyError:
        if not reads_only:
            raise
        return open_store(path, url=_catalog_url(), create=False, readonly=True, **kwargs)


def _remember_url(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta["tdstore_url"] = value


url_opt = click.option(
    "--url", envvar="TDSTORE_URL", default=None, expose_value=False, callback=_remember_url,
    help="SQLAlchemy URL of the catalogue (default: PATH/catalog.sqlite; env TDSTORE_URL), "
         "e.g. postgresql+psycopg://user@host/db.")


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


def _num(x: float) -> str:
    return f"{x:.3g}"


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")


def _finite(obj: Any) -> Any:
    """``obj`` with every float that is not finite (NaN, inf) as None: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "dtype") and hasattr(obj, "tolist"):  # numpy scalars and arrays
        return _finite(obj.tolist())
    return obj


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(_finite(obj), indent=2, default=str, allow_nan=False))


def _pairs(rows: list[tuple[str, Any]]) -> None:
    """``key  value`` lines, the values aligned."""
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


def _table(rows: list[dict[str, Any]], columns: list[str],
           formats: dict[str, Callable[[Any], str]] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    formats = formats or {}
    table = Table(box=None, pad_edge=False)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(formats.get(c, str)(r[c]) for c in columns))
    # on a terminal, fit it; piped output is never cut
    Console(width=None if sys.stdout.isatty() else 1000).print(table)


@contextlib.contextmanager
def _progress(label: str) -> Iterator[Any]:
    """A (done, total, what) callback drawing a bar on a terminal; silent otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{label} {what}")

        yield update


class _Location(click.ParamType):
    """A store location: a directory (a Path) or an object-store URL (kept a str)."""

    name = "location"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Path | str:
        from tdstore.core.location import is_object_url

        if isinstance(value, Path) or is_object_url(value) or "://" in str(value):
            return value  # a URL of another scheme is refused by the store, in one line
        return Path(value)


path_arg = click.argument("path", type=_Location())
json_opt = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
F = TypeVar("F", bound=Callable[..., Any])


def _count(name: str, default: int, help: str, least: int = 1) -> Callable[[F], F]:
    """An option taking a whole number >= ``least``."""
    return click.option(name, default=default, show_default=True,
                        type=click.IntRange(min=least, max=MAX_COUNT), help=help)


def store_command(*arguments: str, name: str | None = None, json: bool = True
                  ) -> Callable[[F], click.Command]:
    """A command on the store at PATH: PATH, then the ``arguments`` (``"group?"`` is
    optional, ``"@file"`` a file path), then ``--json`` unless ``json`` is False."""

    def wrap(f: F) -> click.Command:
        g: Any = json_opt(f) if json else f
        for spec in reversed(arguments):
            if spec.startswith("@"):
                g = click.argument(spec[1:], type=click.Path(path_type=Path))(g)
            else:
                g = click.argument(spec.rstrip("?"), required=not spec.endswith("?"))(g)
        return main.command(name=name)(path_arg(url_opt(g)))

    return wrap


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="tdstore")
def main() -> None:
    """tdstore: persistent master/mirror storage for the KV caches of many LLM agents."""


# --------------------------------------------------------------------------- inspect


@store_command()
def info(path: Path, as_json: bool) -> None:
    """Schema, version, groups, agents, bytes, ratio and reclaimable bytes of a store."""
    with _open(path, reads_only=True) as store:
        data = store.info()
    if as_json:
        _emit_json(data)
        return
    rows = [
        ("store", data["path"]),
        ("schema revision", f"{data['schema_revision']} (latest known {data['schema_head']})"),
        ("tdstore version", f"{data['tdstore_version']} (store created by {data['created_by']})"),
        ("groups", data["groups"]),
        ("agents", data["agents"]),
        ("logical bytes", _bytes(data["bytes_logical"])),
        ("stored bytes", _bytes(data["bytes_stored"])),
        ("compression ratio", f"{data['compression_ratio']:.2f}x"),
        ("reclaimable bytes", f"{_bytes(data['reclaimable_bytes'])} (tdstore gc)"),
        ("size budget", _bytes(data["max_bytes"]) if data["max_bytes"] else "none"),
    ]
    _pairs(rows)


@store_command("group?")
def ls(path: Path, group: str | None, as_json: bool) -> None:
    """List the groups of a store, or the agents of GROUP."""
    with _open(path, reads_only=True) as store:
        if group is None:
            rows = store.ls()
            cols = ["group", "agents", "master", "blocks", "dtype", "bytes_logical",
                    "bytes_stored", "compression_ratio"]
        else:
            rows = store.group(group, create=False).ls()
            cols = ["agent", "role", "blocks", "diff_blocks", "bytes", "last_access", "status"]
    if as_json:
        _emit_json(rows)
        return
    _table(rows, cols, {"bytes_logical": _bytes, "bytes_stored": _bytes, "bytes": _bytes,
                        "last_access": _when, "compression_ratio": lambda r: f"{r:.2f}x",
                        "master": lambda m: m or "-", "dtype": lambda d: d or "-"})


@store_command("group")
def stats(path: Path, group: str, as_json: bool) -> None:
    """The statistics of GROUP (Group.stats())."""
    with _open(path, reads_only=True) as store:
        data = store.group(group, create=False).stats()
    if as_json:
        _emit_json(data)
        return
    _pairs(list(data.items()))


# --------------------------------------------------------------------------- check, reclaim


@store_command()
@click.option("--repair", is_flag=True,
              help="Remove garbage and quarantine agents whose data is damaged.")
def verify(path: Path, repair: bool, as_json: bool) -> None:
    """Check the catalogue against the data and every chunk's checksum.

    Exits 0 when clean, 1 when anything was found.
    """
    with _open(path, reads_only=not repair) as store, _progress("verify") as progress:
        report = store.verify(repair=repair, progress=progress)
    if as_json:
        _emit_json(report.to_dict())
    else:
        for f in report.findings:
            click.echo(str(f))
        for r in report.repaired:
            click.echo(f"repaired: {r}")
        click.echo(f"{report.agents_checked} agents, {report.chunks_checked} chunks checked: "
                   + ("clean" if report.ok else f"{len(report.damage)} damaged, "
                      f"{len(report.garbage)} garbage"))
    sys.exit(0 if report.ok else 1)


@store_command()
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
def gc(path: Path, dry_run: bool, as_json: bool) -> None:
    """Remove data no catalogue row references (after replacements, deletes, crashes)."""
    with _open(path, reads_only=dry_run) as store, _progress("gc") as progress:
        report = store.gc(dry_run=dry_run, progress=progress)
    if as_json:
        _emit_json(report.to_dict())
        return
    verb = "would remove" if dry_run else "removed"
    for p in report.removed:
        click.echo(f"{verb} {p}")
    click.echo(f"{verb} {len(report.removed)} item(s), {_bytes(report.freed_bytes)}")


@store_command()
@click.option("--max-bytes", type=int, required=True, help="Target size of the data.")
@click.option("--dry-run", is_flag=True, help="Only report what would be evicted.")
def evict(path: Path, max_bytes: int, dry_run: bool, as_json: bool) -> None:
    """Evict least-recently-used agents until the data fits in --max-bytes."""
    with _open(path, reads_only=dry_run) as store, _progress("evict"):
        victims = store.evict(max_bytes, dry_run=dry_run)
    if as_json:
        _emit_json([v.__dict__ for v in victims])
        return
    verb = "would evict" if dry_run else "evicted"
    for v in victims:
        click.echo(f"{verb} {v.describe()}")
    click.echo(f"{verb} {len(victims)} item(s), {_bytes(sum(v.nbytes for v in victims))}")


@store_command("max_bytes?")
def budget(path: Path, max_bytes: str | None, as_json: bool) -> None:
    """Show the persisted size budget, or set it to MAX_BYTES ('none' removes it)."""
    value: int | None = None
    if max_bytes is not None and max_bytes.lower() != "none":
        try:
            value = int(max_bytes)
        except ValueError:
            raise click.BadParameter("an integer number of bytes, or 'none'",
                                     param_hint="MAX_BYTES") from None
    with _open(path) as store:
        if max_bytes is not None:
            store.set_max_bytes(value)
        current = store.max_bytes
        used = store.accounted_bytes() if as_json else None
    if as_json:
        _emit_json({"max_bytes": current, "bytes_accounted": used})
        return
    click.echo(f"size budget: {current if current is not None else 'none'}")


# --------------------------------------------------------------------------- rewrite


@store_command("group")
def compact(path: Path, group: str, as_json: bool) -> None:
    """Rewrite GROUP tightly (re-balanced chunks), atomically."""
    with _open(path) as store, _progress("compact"):
        result = store.group(group, create=False).compact()
    if as_json:
        _emit_json(result)
        return
    click.echo(f"group {group!r}: {_bytes(result['bytes_before'])} -> "
               f"{_bytes(result['bytes_after'])}")


@store_command("group")
@click.option("--master", "master", default=None, help="The agent to make the master.")
@click.option("--auto", is_flag=True, help="Choose the master that minimises the total diff.")
def rebase(path: Path, group: str, master: str | None, auto: bool, as_json: bool) -> None:
    """Make another agent the master of GROUP and re-derive every mirror, atomically."""
    if (master is None) == (not auto):
        raise click.UsageError("give exactly one of --master AGENT or --auto")
    with _open(path) as store, _progress("rebase"):
        result = store.group(group, create=False).rebase(master)
    if as_json:
        _emit_json(result)
        return
    click.echo(f"group {group!r}: master {result['previous_master']!r} -> "
               f"{result['master']!r}; diff blocks {result['diff_blocks_before']} -> "
               f"{result['diff_blocks_after']}")


# --------------------------------------------------------------------------- move data


@store_command("group", "agent")
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="A .npy or .safetensors file.")
def export(path: Path, group: str, agent: str, force: bool, output: Path,
           as_json: bool) -> None:
    """Write AGENT's KV blocks to a .npy or .safetensors file (an existing file only with
    --force)."""
    if (output.exists() or output.is_symlink()) and not force:
        raise InvalidInputError(f"export file {output} exists; pass --force to overwrite it")
    with _open(path, reads_only=True) as store, _progress("export"):
        result = store.group(group, create=False).export(agent, output)
    if as_json:
        _emit_json(result)
        return
    click.echo(f"wrote {result['file']}: {result['shape']} {result['dtype']}, "
               f"{_bytes(result['bytes'])}")


@store_command("group", "agent", "@file", name="import")
@click.option("--master", is_flag=True, help="Register as the group's master.")
@click.option("--replace", is_flag=True,
              help="Allow --master to replace the current master, which removes every "
                   "agent of the group (the command lists them).")
@click.option("--dtype", default=None, help="Read raw bits as this dtype (e.g. bfloat16).")
def import_(path: Path, group: str, agent: str, file: Path, master: bool, replace: bool,
            dtype: str | None, as_json: bool) -> None:
    """Register AGENT in GROUP from a .npy or .safetensors file (created if missing).

    A new master replaces the group's agents; that takes --replace."""
    from tdstore.ops.budget import recording

    with _open(path, create=True) as store, _progress("import"):
        if replace and not master:
            raise click.UsageError("--replace only goes with --master")
        created = group not in store
        g = store.group(group)
        try:
            with recording() as evicted:
                result = g.import_file(agent, file, master=master, dtype=dtype,
                                       replace=replace)
        except BaseException:
            if created:  # a group this command made holds nothing: it goes again
                store.discard_empty_group(group)
            raise
    result["evicted"] = [v.describe() for v in evicted]
    if as_json:
        _emit_json(result)
        return
    for name in result["removed"]:
        click.echo(f"removed agent {name!r} (replaced by the new master)")
    for what in result["evicted"]:
        click.echo(f"evicted {what} (size budget)")
    click.echo(f"group {group!r}: {result['role']} {agent!r}, {result['blocks']} blocks, "
               f"{result['diff_blocks']} stored")


@store_command("group", "agent?", json=False)
def rm(path: Path, group: str, agent: str | None) -> None:
    """Delete GROUP, or one AGENT of it."""
    with _open(path) as store:
        if agent is None:
            agents = store.group(group, create=False).agents() if group in store else []
            store.delete_group(group)
            click.echo(f"deleted group {group!r} and its {len(agents)} agent(s)"
                       + (f": {name_list(agents)}" if agents else ""))
        else:
            store.group(group, create=False).delete(agent)
            click.echo(f"deleted agent {agent!r} of group {group!r}")


@store_command(json=False)
@click.option("--to", "revision", default="head", show_default=True,
              help="Schema revision to upgrade or downgrade to (head, or a revision such "
                   "as 0003). A store downgraded stays at that revision until "
                   "`tdstore migrate` upgrades it again.")
def migrate(path: Path, revision: str) -> None:
    """Upgrade (or downgrade) the catalogue schema of a store."""
    with _open(path, upgrade=False) as store:
        current = store.migrate(revision)
    click.echo(f"schema revision: {', '.join(current)}")


@store_command("@dest")
def backup(path: Path, dest: Path, as_json: bool) -> None:
    """Copy the store at PATH to DEST (new or empty) consistently, while it is in use.

    The copy is a local store with its own catalog.sqlite, whatever PATH is (a directory,
    a catalogue on PostgreSQL, an object-store location)."""
    from tdstore.ops.backup import backup as backup_store

    with _progress("backup") as progress:
        report = backup_store(path, dest, progress=progress, url=_catalog_url())
    if as_json:
        _emit_json(report)
        return
    click.echo(f"backed up {report['groups']} group(s), {report['agents']} agent(s), "
               f"{report['arrays']} array(s), {_bytes(report['bytes'])} to "
               f"{report['destination']} in {report['seconds']:.2f} s (verified)")


# --------------------------------------------------------------------------- demo, bench


@main.command()
@click.argument("path", default="tdstore-demo", type=click.Path(path_type=Path))
@_count("--agents", 8, "Agents in the group.")
@_count("--blocks", 256, "Blocks per agent.")
@_count("--tail", 8, "Tail blocks where agents differ.", least=0)
@_count("--near", 4, "Blocks where agents differ by rounding-level noise.", least=0)
def demo(path: Path, agents: int, blocks: int, tail: int, near: int) -> None:
    """Write a synthetic group of agents to PATH, re-read it in a fresh process."""
    from tdstore.dev.demo import DemoWorkload, run

    if tail + near > blocks:
        raise click.BadParameter(f"--tail {tail} plus --near {near} exceed the {blocks} "
                                 "blocks", param_hint="--tail/--near")

    work = DemoWorkload(n_agents=agents, n_blocks=blocks, tail_blocks=tail, near_blocks=near)
    if (path / "catalog.sqlite").exists():
        with _open(path, reads_only=True) as store:
            old = store.group("demo", create=False).agents() if "demo" in store else []
        if old:
            click.echo(f"tdstore demo: replacing group 'demo' of {path}: its {len(old)} "
                       f"agent(s) ({name_list(old)}) are removed")
    click.echo(
        f"tdstore demo: store {path}/, group 'demo': {work.n_agents} agents x "
        f"{work.n_blocks} blocks of {work.block_shape} {work.dtype} "
        f"({work.agent_nbytes / MiB:.1f} MiB each), differing in their last "
        f"{work.tail_blocks} blocks and, by ~1e-3, in {work.near_blocks} more"
    )
    r = run(path, work)
    n = work.n_agents
    logical = n * work.agent_nbytes
    st = r["stats"]
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
        f"space:  logical {logical / MiB:.1f} MiB, stored {st['bytes_stored'] / MiB:.1f} MiB, "
        f"store directory {r['disk_bytes'] / MiB:.1f} MiB; compression ratio "
        f"{st['compression_ratio']:.2f}x (blocks), {logical / r['disk_bytes']:.2f}x (bytes)"
    )
    if ok != n:
        raise click.ClickException("some agents did not reconstruct bit-exactly")


# --------------------------------------------------------------------------- attention A/B


def _ab_config(window: int, block_size: int, queries: int, seed: int,
               q_heads: int | None) -> Any:
    from tdstore.analysis.ab import ABConfig

    return ABConfig(window=window, block_size=block_size, queries=queries, seed=seed,
                    q_heads=q_heads)


def _layers_opt(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter("comma-separated layer numbers, e.g. 0,3,7") from None


ab_options = [
    click.option("--layers", default=None, help="Comma-separated layers (default: all)."),
    _count("--window", 128, "Sparse local window (tokens)."),
    _count("--block-size", 64, "Landmark block size (tokens)."),
    _count("--queries", 64, "Random query positions."),
    click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1),
                 help="Seed of the queries."),
    click.option("--q-heads", type=click.IntRange(min=1), default=None,
                 help="Query heads (a multiple of the kv heads; default: the kv heads)."),
    json_opt,
]


def _with(options: list[Callable[[F], F]]) -> Callable[[F], F]:
    def wrap(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return wrap


def _check_plot(plot: Path | None) -> None:
    """Refuse a plot file that cannot be written before any work is done."""
    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise click.BadParameter(f"{plot}: expected a .png file name", param_hint="--plot")
        if not plot.absolute().parent.is_dir():
            raise click.BadParameter(f"{plot}: directory {plot.absolute().parent} does not "
                                     "exist", param_hint="--plot")


@store_command("group", "agent", json=False)
@click.option("--threshold", type=float, default=None,
              help="Apply this diff threshold instead of the group's (the store is unchanged).")
@click.option("--exact", type=click.Path(path_type=Path), default=None,
              help="An exact copy of the agent's KV (.npy/.safetensors) to compare with.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write a PNG.")
@_with(ab_options)
def ab(path: Path, group: str, agent: str, threshold: float | None, exact: Path | None,
       plot: Path | None, layers: str | None, window: int, block_size: int, queries: int,
       seed: int, q_heads: int | None, as_json: bool) -> None:
    """Attention A/B on AGENT's stored K/V, per layer: dense vs sparse attention, and
    exact vs the store's KV under a diff threshold."""
    from tdstore.analysis import ab as ablib
    from tdstore.ops.files import load_file

    if exact is not None and threshold is not None:
        raise click.UsageError("give --exact FILE or --threshold T, not both: with --exact "
                               "the store's blocks are compared with the file as stored")
    _check_plot(plot)
    with _open(path, reads_only=True) as store:
        g = store.group(group, create=False)
        exact_kv = load_file(exact) if exact is not None else None
        report = ablib.compare(g, agent, _ab_config(window, block_size, queries, seed, q_heads),
                               layers=_layers_opt(layers), threshold=threshold,
                               exact=exact_kv)
    if plot is not None:
        ablib.plot_compare(report, str(plot))
    if as_json:
        _emit_json(report)
        return
    click.echo(f"group {group!r} agent {agent!r}: {report['seq']} tokens, {report['queries']} "
               f"queries x {report['q_heads']} heads; sparse window {window}, block "
               f"{block_size}; (b) {report['comparison_b']} ({report['blocks_kept_at_threshold']}"
               f" of {report['blocks']} blocks kept)")
    rows = []
    for r in report["layers"]:
        a, b = r["dense_vs_sparse"], r["exact_vs_store"]
        rows.append({"layer": r["layer"], "sparse max": a["max_abs_err"],
                     "sparse rel": a["rel_err"], "sparse cos": a["cos_mean"],
                     "sparse KL": a["kl"], "mass kept": a["mass_kept"],
                     "store max": b["max_abs_err"], "store rel": b["rel_err"],
                     "store cos": b["cos_mean"], "store KL": b["kl"]})
    _table(rows, list(rows[0]) if rows else [], {k: _num for k in (rows[0] if rows else {})
                                                  if k != "layer"})
    if plot is not None:
        click.echo(f"plot: {plot}")


@store_command("group", name="ab-sweep", json=False)
@click.option("--thresholds", required=True, help="Comma-separated thresholds, e.g. 0,0.1,1,10.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write a PNG.")
@_with(ab_options)
def ab_sweep(path: Path, group: str, thresholds: str, plot: Path | None, layers: str | None,
             window: int, block_size: int, queries: int, seed: int, q_heads: int | None,
             as_json: bool) -> None:
    """Compression ratio against attention error over a range of diff thresholds (the
    group's stored blocks taken as exact; the store is not changed)."""
    from tdstore.analysis import ab as ablib

    _check_plot(plot)
    with _open(path, reads_only=True) as store, _progress("ab-sweep") as progress:
        report = ablib.sweep(store.group(group, create=False), ablib.parse_thresholds(thresholds),
                             _ab_config(window, block_size, queries, seed, q_heads),
                             layers=_layers_opt(layers), progress=progress)
    if plot is not None:
        ablib.plot_sweep(report, str(plot))
    if as_json:
        _emit_json(report)
        return
    _table(report["rows"], ["threshold", "diff_blocks", "compression_ratio", "rel_err_mean",
                            "max_abs_err", "kl_mean"],
           {"threshold": _num, "compression_ratio": lambda x: f"{x:.2f}x",
            "rel_err_mean": _num, "max_abs_err": _num, "kl_mean": _num})
    if plot is not None:
        click.echo(f"plot: {plot}")


@main.command(name="bench-attention")
@_count("--seq", 8192, "Sequence length (tokens).")
@_count("--q-heads", 8, "Query heads (a multiple of --kv-heads).")
@_count("--kv-heads", 2, "Key/value heads.")
@_count("--head-dim", 64, "Dimension of one head.")
@_count("--window", 128, "Sparse local window (tokens).")
@_count("--block-size", 64, "Landmark block size (tokens).")
@_count("--reps", 3, "Repetitions (the best is reported).")
@json_opt
def bench_attention(seq: int, q_heads: int, kv_heads: int, head_dim: int, window: int,
                    block_size: int, reps: int, as_json: bool) -> None:
    """Time and peak memory of dense vs sparse attention (same inputs, one run)."""
    from tdstore.dev.bench import attention_benchmark

    _must_fit(4 * seq * (q_heads + 2 * kv_heads) * head_dim * 4, "--seq/--q-heads/--head-dim")
    r = attention_benchmark(seq, q_heads, kv_heads, head_dim, window, block_size, reps)
    if as_json:
        _emit_json(r)
        return
    click.echo(f"N={seq}, {q_heads} query heads, {kv_heads} kv heads, head_dim {head_dim}, "
               f"window {window}, block {block_size}; best of {reps}")
    click.echo(f"dense:  {r['dense_s']:.3f} s, peak {r['dense_peak_bytes'] / MiB:.0f} MiB")
    click.echo(f"sparse: {r['sparse_s']:.3f} s, peak {r['sparse_peak_bytes'] / MiB:.0f} MiB")
    click.echo(f"sparse is {r['speedup']:.1f}x faster (target >= 5x); both peaks <= 1 GiB: "
               f"{'yes' if r['peak_ok'] else 'NO'}")


# --------------------------------------------------------------------------- null stats


@main.group()
def nullstats() -> None:
    """The cache of null-adapter statistics kept in a store's catalogue."""


@nullstats.command(name="ls")
@path_arg
@url_opt
@json_opt
def nullstats_ls(path: Path, as_json: bool) -> None:
    """List the cached entries."""
    from tdstore.analysis.nullstats import NullStatsCache

    with _open(path, reads_only=True) as store:
        rows = NullStatsCache(store).keys()
    if as_json:
        _emit_json(rows)
        return
    _table(rows, ["key_hash", "schema_version", "created_at", "key"],
           {"created_at": _when, "key_hash": lambda h: h[:16],
            "key": lambda k: k if len(k) < 100 else k[:97] + "..."})


@nullstats.command(name="show")
@path_arg
@url_opt
@click.argument("key_hash")
@json_opt
def nullstats_show(path: Path, key_hash: str, as_json: bool) -> None:
    """Show one entry (KEY_HASH: the hash or a unique prefix of it)."""
    from tdstore.analysis.nullstats import NullStatsCache, is_plain

    with _open(path, reads_only=True) as store:
        entry = NullStatsCache(store).show(key_hash)
    if as_json:
        _emit_json(entry)
        return
    _pairs([(k, entry[k]) for k in ("key_hash", "key", "schema_version")]
           + [("created_at", _when(entry["created_at"]))])
    stats = entry["stats"] or {}
    tables = {"-": stats} if is_plain(stats) else \
        (stats.get("by_rank") or {"-": stats.get("kinds", {})})
    rows = [{"rank": rank, "kind": kind, **e} for rank, table in tables.items()
            for kind, e in table.items()]
    if rows:
        _table(rows, ["rank", "kind", "mean", "std", "n", "degenerate"],
               {"mean": lambda x: f"{x:.6g}", "std": lambda x: f"{x:.6g}"})


@nullstats.command(name="rm")
@path_arg
@url_opt
@click.argument("key_hash")
def nullstats_rm(path: Path, key_hash: str) -> None:
    """Remove one entry (KEY_HASH: the hash or a unique prefix of it)."""
    from tdstore.analysis.nullstats import NullStatsCache
    from tdstore.core.errors import NotFoundError

    with _open(path) as store:
        if not NullStatsCache(store).delete(key_hash):
            raise NotFoundError(f"no null stats under {key_hash!r}")
    click.echo(f"removed {key_hash}")


@nullstats.command(name="clear")
@path_arg
@url_opt
def nullstats_clear(path: Path) -> None:
    """Remove every entry."""
    from tdstore.analysis.nullstats import NullStatsCache

    with _open(path) as store:
        n = NullStatsCache(store).clear()
    click.echo(f"removed {n} entries")


@main.command(name="bench-nullstats")
@_count("--gets", 5000, "Cache hits per repetition.")
@_count("--reps", 5, "Repetitions (the best is reported).")
@json_opt
def bench_nullstats(gets: int, reps: int, as_json: bool) -> None:
    """A null-stats cache hit vs diskcache.Cache.get of the same payload."""
    from tdstore.dev.bench import nullstats_benchmark

    r = nullstats_benchmark(gets, reps)
    if as_json:
        _emit_json(r)
        return
    click.echo(f"payload {r['payload_bytes']} bytes; best of {reps} x {gets} gets")
    _pairs([("tdstore NullStatsCache.get", f"{r['tdstore_us']:.1f} us per hit"),
            ("diskcache.Cache.get", f"{r['diskcache_us']:.1f} us per hit")])
    click.echo(f"ratio {r['ratio']:.2f}x (target <= 1.5x); both include hashing the key "
               f"({r['hash_us']:.1f} us)")


def _must_fit(nbytes: int, options: str) -> None:
    """Refuse a workload that cannot fit in this machine's free memory."""
    import psutil

    available = psutil.virtual_memory().available
    if nbytes > available:
        raise click.BadParameter(f"the workload needs about {_bytes(nbytes)} of memory; "
                                 f"{_bytes(available)} are free", param_hint=options)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated ints, e.g. 2,16,8,128",
                                 param_hint="--block-shape") from None
    if not shape or min(shape) < 1:
        raise click.BadParameter(f"{text!r}: every dimension must be >= 1",
                                 param_hint="--block-shape")
    return shape


@main.command()
@_count("--agents", 8, "Agents in the group (one master, the rest mirrors).", least=2)
@_count("--blocks", 1024, "Blocks per agent.")
@click.option("--block-shape", default="2,16,8,128", show_default=True,
              help="Comma-separated shape of one block (2,16,8,128: 64 KiB in float16).")
@click.option("--dtype", default="float16", show_default=True,
              type=click.Choice(["float16", "bfloat16", "float32", "float64", "int8", "uint8"]),
              help="Dtype of the KV blocks.")
@click.option("--diff-fraction", default=0.05, show_default=True,
              type=click.FloatRange(min=0, max=1, min_open=True),
              help="Share of tail blocks in which each mirror differs from the master.")
@_count("--reps", 5, "Repetitions of each measurement (the best is reported).")
@_count("--scaling-mirrors", 200, "Mirrors written in the scaling test.", least=2)
@_count("--open-agents", 10_000, "Agents in the catalogue of the open-time test.")
@click.option("--big-gib", default=4.0, show_default=True, type=click.FloatRange(min=0),
              help="GiB reconstructed into an np.memmap in the memory test; 0 skips it.")
@click.option("--dir", "workdir", default=None, type=click.Path(file_okay=False),
              help="Where the stores and baseline files go (default: the system temp dir).")
@click.option("--location", default=None,
              help="Benchmark an object-store location instead (s3://BUCKET/PREFIX, needs "
                   "--url): tdstore vs one object per agent through the same client.")
@url_opt
@_count("--scale-agents", 1_000_000, "Agents in the large catalogue of the object-store "
        "open-time test (0 skips it).", least=0)
@json_opt
def bench(agents: int, blocks: int, block_shape: str, dtype: str, diff_fraction: float,
          reps: int, scaling_mirrors: int, open_agents: int, big_gib: float,
          workdir: str | None, location: str | None, scale_agents: int,
          as_json: bool) -> None:
    """Benchmark tdstore against np.save/np.load, safetensors, diskcache and memcpy.

    Every figure is measured in the same run and reported as a ratio against those
    baselines (shared machines are noisy)."""
    from tdstore.dev.bench import Workload, print_report
    from tdstore.dev.bench import run as run_bench

    if not math.isfinite(diff_fraction):
        raise click.BadParameter(f"{diff_fraction}: expected a number in (0, 1]",
                                 param_hint="--diff-fraction")
    w = Workload(agents=agents, blocks=blocks, block_shape=_shape(block_shape), dtype=dtype,
                 diff_fraction=diff_fraction, reps=reps, scaling_mirrors=scaling_mirrors,
                 open_agents=open_agents, big_gib=big_gib)
    # the agents, their np.save/safetensors copies and the outputs are in memory at once
    _must_fit(3 * w.agents * w.agent_nbytes, "--agents/--blocks/--block-shape")
    if workdir is not None and not Path(workdir).is_dir():
        raise click.BadParameter(f"{workdir}: no such directory", param_hint="--dir")

    def log(message: str) -> None:
        click.echo(message, err=as_json)

    if location is not None:
        from tdstore.dev.bench import object_benchmark, print_object_report

        url = _catalog_url()
        if url is None:
            raise InvalidInputError(f"bench --location {location}: needs the catalogue's "
                                    "--url (PostgreSQL)")
        objects = object_benchmark(location, url, w, scale_agents=scale_agents,
                                   progress=log, workdir=workdir)
        if as_json:
            _emit_json(objects)
        else:
            print_object_report(objects, echo=click.echo)
        return
    report = run_bench(w, workdir, progress=log)
    if as_json:
        _emit_json(report)
    else:
        print_report(report, echo=click.echo)


if __name__ == "__main__":
    main()
