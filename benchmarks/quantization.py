"""Weight quantization per stage: artifact bytes, worker memory, stage time and output error.

    .venv/bin/python benchmarks/quantization.py [--repeats 20] [--json results.json]
        [--markdown]

For each sample (GPT-2, ResNet and a wider GPT-2) the whole model is one stage, exported in
each weight format. A fresh process loads the artifact the way a worker does
(``load_program``) and reports its resident memory growth (psutil) and the median stage
time on one thread; the error is the stage's outputs against the float32 stage's: the
largest absolute difference, that difference over the largest float32 output, and the
difference's L2 norm over the float32 output's (the worst output of the stage).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import report
import torch

from coordinator.samples import SAMPLES, build_sample, gpt2
from partition.artifact import load_program, program_to_bytes
from partition.layers import build_layer_graph
from partition.loader import export_module
from partition.modules import build_range_module
from partition.quantize import WeightFormat, quantize_module
from partition.units import format_bytes

SAMPLE_MODELS = {"gpt2": SAMPLES["gpt2"], "resnet": SAMPLES["resnet"],
                 "gpt2-512": gpt2(layers=4, width=512)}

_WORKER = """
import sys, time, statistics, json, psutil, torch
torch.set_num_threads(1)
from partition.artifact import load_program, program_to_bytes
inputs = torch.load(sys.argv[2])
process = psutil.Process()
before = process.memory_info().rss
data = open(sys.argv[1], "rb").read()
program = load_program(data)
del data
after = process.memory_info().rss
times = []
with torch.no_grad():
    for _ in range(3):
        program(*inputs)
    for _ in range(int(sys.argv[3])):
        start = time.perf_counter()
        program(*inputs)
        times.append(time.perf_counter() - start)
print(json.dumps({"rss_bytes": after - before, "median_s": statistics.median(times)}))
"""


def stage_artifact(module: torch.fx.GraphModule, inputs: tuple, fmt: WeightFormat) -> bytes:
    """``module`` with its weights in ``fmt``, exported and saved as a stage artifact."""
    return program_to_bytes(export_module(quantize_module(module, fmt), inputs,
                                          origin=fmt.value))


def in_worker(path: Path, inputs_path: Path, repeats: int) -> dict[str, float]:
    """Load and run the artifact at ``path`` in a fresh process; its memory and time."""
    out = subprocess.run([sys.executable, "-c", _WORKER, str(path), str(inputs_path),
                          str(repeats)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(name: str, repeats: int, folder: Path) -> list[dict[str, object]]:
    module, inputs = build_sample(SAMPLE_MODELS[name])
    layer_graph = build_layer_graph(export_module(module, inputs, origin=name))
    ranged = build_range_module(layer_graph, 0, layer_graph.num_layers)
    inputs_path = folder / f"{name}-inputs.pt"
    torch.save(tuple(inputs), inputs_path)
    rows, reference = [], None
    for fmt in WeightFormat:
        data = stage_artifact(ranged.module, inputs, fmt)
        path = folder / f"{name}-{fmt.value}.pt2"
        path.write_bytes(data)
        with torch.no_grad():
            outputs = load_program(data)(*inputs)
        reference = reference or outputs
        error = max((a - b).abs().max().item() for a, b in zip(outputs, reference, strict=True))
        scale = max(b.abs().max().item() for b in reference)
        l2 = max(((a - b).norm() / b.norm()).item()
                 for a, b in zip(outputs, reference, strict=True))
        rows.append({"model": name, "weights": fmt.value, "artifact_bytes": len(data),
                     **in_worker(path, inputs_path, repeats),
                     "max_abs_error": error, "max_rel_error": error / scale,
                     "rel_l2_error": l2})
    for row in rows:
        row["artifact_share"] = row["artifact_bytes"] / rows[0]["artifact_bytes"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per stage")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    report.add_markdown_option(parser)
    args = parser.parse_args()
    with report.usual_output(args.markdown), tempfile.TemporaryDirectory() as folder:
        rows = [row for name in SAMPLE_MODELS for row in measure(name, args.repeats,
                                                                  Path(folder))]
        table = [f"{'model':<9} {'weights':<7} {'artifact':>10} {'% f32':>6} "
                 f"{'worker RSS':>11} {'stage ms':>9} {'max abs err':>11} "
                 f"{'max rel err':>11} {'rel L2 err':>10}"]
        table += [f"{row['model']:<9} {row['weights']:<7} "
                  f"{format_bytes(row['artifact_bytes']):>10} "
                  f"{100 * row['artifact_share']:>5.1f}% {format_bytes(row['rss_bytes']):>11} "
                  f"{1000 * row['median_s']:>9.2f} {row['max_abs_error']:>11.2e} "
                  f"{row['max_rel_error']:>11.2e} {row['rel_l2_error']:>10.2e}" for row in rows]
        print("\n".join(table))
    if args.markdown:
        print(report.markdown(table))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
