"""``coordinator plan``: profile, optimize and write ``plan.json``."""

from __future__ import annotations

import argparse
import math

from coordinator.calibration import read_calibration
from coordinator.console import console, progress_bar
from coordinator.model_options import add_model_arguments, load_from_arguments
from coordinator.plan_tables import (
    baselines_table,
    compression_lines,
    media_table,
    replication_line,
    stages_table,
    totals_line,
)
from coordinator.plot import plot_plan
from partition.cluster import (
    ClusterSpec,
    every_node_quantized,
    load_cluster,
    memory_for_stages,
    with_default_quantize,
)
from partition.compression_choice import Inputs, calibration_inputs, weight_offer
from partition.compression_planning import CompressionRequest, CompressMode
from partition.cost_builder import layer_seconds, node_profiles
from partition.errors import EdgesplitError
from partition.layers import LayerGraph
from partition.loader import LoadedModel
from partition.plan import Objective, Plan
from partition.planning import plan
from partition.profile_store import cached_profile
from partition.profiler import Profile
from partition.quantize import WeightFormat

DEFAULT_MAX_ERROR = 0.01
"""Default ``--max-error``: 1% of the largest float32 output."""
CALIBRATION_INPUTS = 4
"""Random calibration inputs drawn when no ``--calibration`` file is given."""
OFFERED_WEIGHTS = (WeightFormat.INT8, WeightFormat.INT4)
"""Weight formats ``--compress auto`` may choose per stage besides the node's own."""


def add_parsers(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("plan", help="choose where each part of the model runs")
    add_model_arguments(parser)
    parser.add_argument("--nodes", required=True, metavar="NODES.yaml", help="the cluster")
    parser.add_argument(
        "--objective", choices=[o.value for o in Objective], default=Objective.THROUGHPUT.value,
        help="minimize one request's latency, or maximize requests per second (default)",
    )
    parser.add_argument(
        "--quantize-weights", choices=[f.value for f in WeightFormat],
        default=WeightFormat.NONE.value, metavar="|".join(f.value for f in WeightFormat),
        help="how stages store their weights, unless a node's `quantize` in NODES.yaml says "
        "otherwise (default: none, float32)",
    )
    parser.add_argument(
        "--no-replicate", dest="replicate", action="store_false",
        help="run every stage on one node (by default a slow stage may run on several nodes "
             "at once, requests dealt among them; runtimes before plan schema 2 cannot)",
    )
    parser.add_argument("-o", "--output", default="plan.json", help="where to write the plan")
    parser.add_argument("--plot", metavar="PNG", help="also draw the pipeline over time")
    parser.add_argument(
        "--profile", action="append", default=[], metavar="NODE=FILE",
        help="use a profile measured on NODE (`coordinator profile --json` run there)",
    )
    parser.add_argument(
        "--profile-on-nodes", action="store_true",
        help="ask every reachable node to profile the model on its own hardware, and how "
             "much memory its worker takes before any stage",
    )
    parser.add_argument(
        "--compress", choices=[m.value for m in CompressMode], default=CompressMode.NONE.value,
        help="link encoding: none (default), one encoding on every link, or auto: each "
             "link's encoding and each stage's weight format (none, int8, int4) chosen with "
             "the split, within --max-error",
    )
    parser.add_argument(
        "--max-error", type=float, default=DEFAULT_MAX_ERROR, metavar="E",
        help="largest output difference from float32, relative to the largest output, on the "
             f"calibration inputs (default {DEFAULT_MAX_ERROR})",
    )
    parser.add_argument(
        "--calibration", metavar="FILE",
        help="torch.save of a list of inputs to measure errors on (default: "
             f"{CALIBRATION_INPUTS} random inputs of the model's signature)",
    )
    parser.add_argument(
        "--budget-units", type=int, default=16, metavar="N",
        help="steps the error budget is divided into for the search (finer is slower)",
    )
    parser.add_argument("--threads", type=int, default=1, help="threads for the local profile")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per layer")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.max_error) and args.max_error >= 0):
        raise EdgesplitError(f"--max-error must be a number >= 0, got {args.max_error}; "
                             f"pass for example --max-error {DEFAULT_MAX_ERROR}")
    if args.budget_units < 1:
        raise EdgesplitError(f"--budget-units must be at least 1, got {args.budget_units}; "
                             "pass for example --budget-units 16")
    model, layer_graph = load_from_arguments(args)
    cluster = with_default_quantize(load_cluster(args.nodes),
                                    WeightFormat(args.quantize_weights))
    mode = CompressMode(args.compress)
    quantized = any(node.quantize not in (None, WeightFormat.NONE) for node in cluster.nodes)
    measure = mode is not CompressMode.NONE or quantized  # every compressed plan's accuracy
    inputs = calibration(args, model) if measure else ()
    offered = OFFERED_WEIGHTS if mode is CompressMode.AUTO else ()
    profiles, by_format = gather_profiles(args, model, layer_graph, cluster, offered)
    compression = None if not measure else CompressionRequest(
        mode, tuple(inputs), args.max_error, args.budget_units,
        weight_offer(layer_graph, {fmt: layer_seconds(cluster, by_format[fmt])
                                   for fmt in offered}) if offered else None,
        args.calibration,
    )
    overheads = {}
    if args.profile_on_nodes:
        from coordinator.remote_profile import worker_overheads

        overheads = worker_overheads(cluster)
    result = plan(model, layer_graph, memory_for_stages(cluster, overheads), profiles,
                  Objective(args.objective), compression, args.replicate)
    result.save(args.output)
    show_plan(result)
    console.print(f"wrote {args.output}")
    if args.plot:
        plot_plan(result, args.plot)
        console.print(f"wrote {args.plot}")
    return 0


def show_plan(result: Plan) -> None:
    console.print(stages_table(result))
    console.print(totals_line(result))
    if (media := media_table(result)) is not None:
        console.print(media)
    for line in replication_line(result) + compression_lines(result):
        console.print(line)
    console.print(baselines_table(result))


def calibration(args: argparse.Namespace, model: LoadedModel) -> list[Inputs]:
    """The ``--calibration`` inputs, else random ones of the model's signature."""
    if args.calibration:
        return read_calibration(args.calibration, model)
    return calibration_inputs(model, CALIBRATION_INPUTS)


def gather_profiles(
    args: argparse.Namespace, model: LoadedModel, layer_graph: LayerGraph, cluster: ClusterSpec,
    offered: tuple[WeightFormat, ...] = (),
) -> tuple[dict[str, Profile], dict[WeightFormat, dict[str, Profile]]]:
    """This machine's profile (in each node's weight format), overridden per node by
    ``--profile`` files and, with ``--profile-on-nodes``, by measurements taken on the nodes
    themselves (their float32 times); and each node's profile in each ``offered`` format,
    made the same way."""
    given: dict[str, Profile] = {}
    for item in args.profile:
        name, sep, path = item.partition("=")
        if not sep or name not in cluster.names:
            raise EdgesplitError(
                f"--profile {item!r} must be NODE=FILE with NODE one of {', '.join(cluster.names)}"
            )
        profile = Profile.load(path)
        profile.check_matches(model.sha256, layer_graph, path)
        given[name] = profile
    if args.profile_on_nodes:
        from coordinator.remote_profile import profile_on_nodes

        given.update(profile_on_nodes(model, layer_graph, cluster, exclude=set(given),
                                      repeats=args.repeats))
    with progress_bar("profiling on this machine", 3 + args.repeats) as update:
        local, _ = cached_profile(
            model, layer_graph, threads=args.threads, repeats=args.repeats, progress=update
        )
    quantized = {}
    wanted = {node.quantize for node in cluster.nodes if node.name not in given} | set(offered)
    for fmt in sorted(wanted - {None, WeightFormat.NONE}, key=lambda f: f.value):
        with progress_bar(f"profiling {fmt.value} weights", 3 + args.repeats) as update:
            quantized[fmt], _ = cached_profile(
                model, layer_graph, threads=args.threads, repeats=args.repeats,
                progress=update, weights=fmt,
            )
    by_format = {fmt: node_profiles(every_node_quantized(cluster, fmt), local, given, quantized)
                 for fmt in offered}
    return node_profiles(cluster, local, given, quantized), by_format
