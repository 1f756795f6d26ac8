"""How well the sum of per-layer timings predicts the whole model's forward time.

Usage: python benchmarks/profiler_accuracy.py [--models gpt2 bert vit resnet mobilenet_v2]
       [--threads 1] [--repeats 20] [--warmup 3] [--granularity auto] [--json results.json]
       [--markdown]

Each model is built from a ``transformers`` config with random weights (no downloads),
exported, grouped into layers and profiled exactly as ``coordinator profile`` does: the
layers run one after another, each timed on its own, then the whole exported program.
"(IQR)" is the interquartile spread of the whole-model runs (large when the machine is busy).
"ratio" is the sum of the layer medians over the whole-model median; the planner adds layer
times, so a ratio within 15% of 1 means its compute predictions are trustworthy here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform

import report
import torch

from coordinator.samples import (
    SampleBuilder,
    bert,
    build_sample,
    gpt2,
    mobilenet_v2,
    resnet,
    vit,
)
from partition.layers import build_layer_graph
from partition.loader import export_module
from partition.profiler import device_name, profile_layers

MODELS: dict[str, SampleBuilder] = {
    "gpt2": gpt2(layers=6, width=256, seq=128),
    "bert": bert(layers=6, width=256, seq=128),
    "vit": vit(layers=6, width=256, image=128),
    "resnet": resnet(image=160),
    "mobilenet_v2": mobilenet_v2(image=160),
}
SIZES = {
    "gpt2": "6 layers, width 256, seq 128",
    "bert": "6 layers, width 256, seq 128",
    "vit": "6 layers, width 256, image 128",
    "resnet": "image 160",
    "mobilenet_v2": "image 160",
}
TOLERANCE = 0.15
"""How far the ratio may be from 1 and still count as accurate."""
HEADER = (f"{'model':<13} {'layers':>6} {'sum of layers ms':>16} {'whole model ms':>14} "
          f"{'(IQR)':>7} {'ratio':>6}  within ±{TOLERANCE:.0%}")


def measure(name: str, args: argparse.Namespace) -> dict[str, object]:
    module, inputs = build_sample(MODELS[name])
    program = export_module(module, inputs, origin=name)
    layer_graph = build_layer_graph(program, args.granularity)
    profile = profile_layers(
        layer_graph, hashlib.sha256(name.encode()).hexdigest(), inputs,
        threads=args.threads, repeats=args.repeats, warmup=args.warmup,
    )
    ratio = profile.layer_sum_s / profile.model_median_s
    return {
        "model": name, "size": SIZES[name], "layers": layer_graph.num_layers,
        "layer_sum_ms": profile.layer_sum_s * 1e3,
        "model_median_ms": profile.model_median_s * 1e3,
        "model_spread_ms": profile.model_spread_s * 1e3,
        "ratio": ratio, "within_tolerance": abs(ratio - 1) <= TOLERANCE,
    }


def row_line(row: dict[str, object]) -> str:
    """One model's row of the table under :data:`HEADER`."""
    return (f"{row['model']:<13} {row['layers']:>6} {row['layer_sum_ms']:>16.2f} "
            f"{row['model_median_ms']:>14.2f} {row['model_spread_ms']:>7.2f} "
            f"{row['ratio']:>6.3f}  {'yes' if row['within_tolerance'] else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--granularity", default="auto")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    report.add_markdown_option(parser)
    args = parser.parse_args()

    rows = []
    with report.usual_output(args.markdown):
        print(f"{device_name()}, torch {torch.__version__}, {args.threads} thread(s), "
              f"median of {args.repeats} after {args.warmup} warm-up runs")
        print(HEADER)
        print("-" * len(HEADER))
        for name in args.models:
            rows.append(measure(name, args))
            print(row_line(rows[-1]), flush=True)
    if args.markdown:
        print(report.markdown([HEADER, *map(row_line, rows)]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"machine": platform.platform(), "device": device_name(),
                       "torch": torch.__version__, "threads": args.threads,
                       "repeats": args.repeats, "warmup": args.warmup,
                       "granularity": args.granularity, "tolerance": TOLERANCE,
                       "rows": rows}, out, indent=2)


if __name__ == "__main__":
    main()
