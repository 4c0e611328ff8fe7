#!/usr/bin/env python3
"""LMCache benchmark: tdstore's backend vs LMCache's LocalDiskBackend, same engine and chunks.

    python tools/bench_lmcache.py [--sequences 8] [--tokens 2048] [--layers 32] [--json]
"""

import json

import click

from tdstore.dev.lmcache_bench import run


@click.command(help=__doc__.splitlines()[0])
@click.option("--sequences", default=8, show_default=True, type=click.IntRange(min=1),
              help="Token sequences stored and retrieved.")
@click.option("--tokens", default=2048, show_default=True, type=click.IntRange(min=1),
              help="Tokens per sequence (chunks of 256).")
@click.option("--layers", default=32, show_default=True, type=click.IntRange(min=1),
              help="Layers of the model (a chunk is 2 x layers x 256 x hidden float16).")
@click.option("--hidden", default=256, show_default=True, type=click.IntRange(min=16),
              help="KV heads x head size (a multiple of 16); 256: a chunk of 8 MiB.")
@click.option("--agents", default=4, show_default=True, type=click.IntRange(min=2),
              help="Agents in the sharing workload.")
@click.option("--dir", "workdir", default=None, type=click.Path(file_okay=False),
              help="Where the stores go (default: the system temp dir).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def main(sequences: int, tokens: int, layers: int, hidden: int, agents: int,
         workdir: str | None, as_json: bool) -> None:
    if hidden % 16:
        raise click.BadParameter(f"{hidden}: expected a multiple of 16", param_hint="--hidden")
    report = run(sequences=sequences, tokens=tokens, layers=layers, hidden=hidden,
                 agents=agents, workdir=workdir)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    w = report["workload"]
    click.echo(f"workload: {w['sequences']} sequences x {w['tokens']} tokens, {w['chunks']} "
               f"chunks, {w['chunk_bytes'] / 2**20:.0f} MiB of KV")
    for kind, r in report["results"].items():
        click.echo(f"{kind}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()))
    click.echo("sharing: " + ", ".join(f"{k} {v:.4g}" for k, v in report["sharing"].items()))
    for name, t in report["ratios"].items():
        goal = "" if t["target"] is None else f" (goal {t['direction']} {t['target']:g}: " \
            f"{'met' if t['met'] else 'NOT met'})"
        click.echo(f"{name}: {t['value']:.3f}{goal}")


if __name__ == "__main__":
    main()
