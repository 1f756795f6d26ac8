"""``coordinator profile``: time each layer of a model on this machine."""

from __future__ import annotations

import argparse

from rich.table import Table

from coordinator.console import console, ms, progress_bar
from coordinator.model_options import add_model_arguments, load_from_arguments
from partition.profile_store import cached_profile
from partition.profiler import Profile
from partition.units import format_bytes


def add_parsers(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("profile", help="time each layer of a model on this machine")
    add_model_arguments(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the profile as JSON")
    parser.add_argument("--refresh", action="store_true", help="ignore the cached profile")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, layer_graph = load_from_arguments(args)
    total = args.warmup + args.repeats
    with progress_bar(f"profiling {layer_graph.num_layers} layers", total) as update:
        profile, cached = cached_profile(
            model, layer_graph, threads=args.threads, repeats=args.repeats,
            warmup=args.warmup, progress=update, refresh=args.refresh,
        )
    console.print(profile_table(profile))
    note = " (cached; --refresh to measure again)" if cached else ""
    console.print(
        f"whole model forward: {ms(profile.model_median_s)} ms median; "
        f"sum of layers: {ms(profile.layer_sum_s)} ms "
        f"({profile.layer_sum_s / profile.model_median_s:.1%} of it){note}"
    )
    if args.json:
        profile.save(args.json)
        console.print(f"wrote {args.json}")
    return 0


def profile_table(profile: Profile) -> Table:
    table = Table(
        title=f"{profile.device}, {profile.threads} thread(s), median of {profile.repeats}"
    )
    for column in ("#", "layer", "ops", "params", "output", "median ms", "spread ms"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for index, layer in enumerate(profile.layers):
        table.add_row(
            str(index), layer.name, str(layer.ops), format_bytes(layer.param_bytes),
            format_bytes(layer.output_bytes), ms(layer.median_s), ms(layer.spread_s),
        )
    return table
