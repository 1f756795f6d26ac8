"""Peer baseline: torch.distributed.pipelining (PiPPy in core torch) on gloo, CPU, one host.

Usage: python benchmarks/peer_pipelining.py [--model gpt2 bert resnet] [--requests 40]
       [--microbatches 1] [--json FILE]

Every rank is its own process with one thread, builds the same seeded sample model from
``coordinator.samples``, traces it with ``pipeline()`` and runs its stage under
``ScheduleGPipe`` without a loss function (forward only, under ``torch.no_grad()``).
A request is one full sample batch. Two ways of feeding requests are measured:

- ``stream`` (the headline): one schedule step over all requests, each request cut into
  ``microbatches`` microbatches, so the pipeline fills once and stays full;
- ``per_request``: one schedule step per request, so the pipeline fills and drains for
  every request.

Time runs from rank 0 leaving a barrier to the last rank holding the last output; both read
the same system-wide monotonic clock. The single-process rows run the whole model in one
process with 1 or 2 threads; "ratio" is throughput over the 2-thread single process.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import time
import warnings
from datetime import timedelta
from typing import Any

import torch

from coordinator.ports import free_ports

MODES = ("stream", "per_request")
HEADLINE_MODE = "stream"
WARMUP_REQUESTS = 2

# The CLI's models: sample builder keyword arguments and a balanced 2-stage split point.
CASES: dict[str, tuple[dict[str, int], list[str]]] = {
    "gpt2": ({"layers": 8, "width": 512, "batch": 8, "seq": 128}, ["h.4"]),
    "bert": ({"layers": 8, "width": 512, "batch": 8, "seq": 128}, ["model.encoder.layer.4"]),
    "resnet": ({"image": 128, "batch": 8}, ["encoder.stages.2"]),
}


class FirstOutput(torch.nn.Module):
    """Return only the first output of ``model`` (a tensor), so pipelining can trace it.

    ``transformers`` models return a ``ModelOutput``; its first entry is the last hidden state.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        output = self.model(*inputs)
        return output if isinstance(output, torch.Tensor) else output[0]


def build_wrapped(builder_name: str, builder_kwargs: dict) -> tuple[FirstOutput, tuple]:
    """Build a seeded sample from ``coordinator.samples`` and wrap it in ``FirstOutput``."""
    from coordinator import samples

    if builder_name not in samples.SAMPLES:
        raise ValueError(f"unknown sample {builder_name!r}; known: {sorted(samples.SAMPLES)}")
    model, inputs = samples.build_sample(getattr(samples, builder_name)(**builder_kwargs))
    return FirstOutput(model).eval(), inputs


def error_line(error: BaseException) -> str:
    """One line naming the exception type and the first line of its message (and its cause)."""

    def describe(exc: BaseException) -> str:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]

    cause = error.__cause__
    return describe(error) + (f" (caused by {describe(cause)})" if cause else "")


def run_processes(target, args_per_process: list[tuple], timeout_s: float) -> list[dict]:
    """Run ``target(index, queue, *args)`` in spawned processes and gather one dict from each.

    Returns the dicts ordered by index, or a single ``{"ok": False, ...}`` dict as soon as one
    process reports a failure, dies, or the timeout passes. Every process is ended on return.
    Processes are spawned, so a calling script needs an ``if __name__ == "__main__":`` guard.
    """
    context = mp.get_context("spawn")
    results: queue.Queue = context.Queue()
    processes = [
        context.Process(target=target, args=(index, results, *args), daemon=True)
        for index, args in enumerate(args_per_process)
    ]
    gathered: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    try:
        for process in processes:
            process.start()
        while len(gathered) < len(processes):
            try:
                index, result = results.get(timeout=min(1.0, max(deadline - time.monotonic(), 0)))
            except queue.Empty:
                dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    return [{"ok": False, "error": f"a process exited with code {dead[0]}"}]
                if time.monotonic() >= deadline:
                    return [{"ok": False, "error": f"TimeoutError: no result within {timeout_s}s"}]
                continue
            if not result["ok"]:
                return [result]
            gathered[index] = result
        return [gathered[index] for index in range(len(processes))]
    finally:
        grace_s = 5.0 if len(gathered) == len(processes) else 0.0
        for process in processes:
            if process.pid is None:  # never started
                continue
            process.join(timeout=grace_s)
            if process.is_alive():
                process.kill()
                process.join()
        results.close()


def _single_process_worker(
    index: int, results: queue.Queue, builder_name: str, builder_kwargs: dict,
    threads: int, requests: int,
) -> None:
    """Time ``requests`` full-batch forwards of the whole model with ``threads`` threads."""
    try:
        torch.set_num_threads(threads)
        model, inputs = build_wrapped(builder_name, builder_kwargs)
        with torch.no_grad():
            for _ in range(WARMUP_REQUESTS):
                model(*inputs)
            began = time.monotonic()
            for _ in range(requests):
                model(*inputs)
            seconds = time.monotonic() - began
        results.put((index, {"ok": True, "seconds": seconds}))
    except Exception as error:  # noqa: BLE001 - reported to the parent, which never raises
        results.put((index, {"ok": False, "error": error_line(error)}))


def measure_single_process(
    builder_name: str, builder_kwargs: dict, *, threads: int, requests: int,
    timeout_s: float = 300,
) -> dict:
    """Throughput (requests/s) of the whole model in one fresh process with ``threads`` threads.

    A request is one forward of the sample's full batch under ``torch.no_grad()``, timed after
    a warm-up of two forwards.
    """
    (result,) = run_processes(
        _single_process_worker,
        [(builder_name, builder_kwargs, threads, requests)],
        timeout_s,
    )
    base = {"threads": threads, "requests": requests, "torch": torch.__version__}
    if not result["ok"]:
        return {**base, "ok": False, "error": result["error"]}
    return {**base, "ok": True, "seconds": result["seconds"],
            "throughput_per_s": requests / result["seconds"]}


def _microbatches_of(inputs: tuple, microbatches: int) -> tuple:
    """The first microbatch of each input when the batch is cut into ``microbatches``."""
    batch = inputs[0].shape[0]
    if batch % microbatches:
        raise ValueError(f"batch {batch} does not split into {microbatches} microbatches")
    return tuple(tensor[: batch // microbatches] for tensor in inputs)


def _run_mode(stage, mode: str, inputs: tuple, requests: int, microbatches: int) -> dict:
    """Run ``requests`` requests through ``stage`` in ``mode``; return timing and output.

    The timing includes the schedule's first-step setup, which for a traced pipeline only
    allocates receive buffers (the stage itself should be warm already).
    """
    from torch.distributed import barrier
    from torch.distributed.pipelining import ScheduleGPipe

    steps, per_step = (1, requests) if mode == "stream" else (requests, 1)
    schedule = ScheduleGPipe(stage, n_microbatches=per_step * microbatches)
    step_inputs = tuple(torch.cat([tensor] * per_step) for tensor in inputs)

    def step():
        return schedule.step(*step_inputs) if stage.is_first else schedule.step()

    barrier()
    began = time.monotonic()
    first_output = step()
    for _ in range(steps - 1):
        step()
    ended = time.monotonic()
    return {"began": began, "ended": ended, "output": first_output}


def _rank_worker(
    rank: int, results: queue.Queue, world_size: int, port: int, builder_name: str,
    builder_kwargs: dict, split_fqns: list[str], requests: int, microbatches: int,
    timeout_s: float,
) -> None:
    """One pipeline rank: trace, build this rank's stage, warm it up, time both modes."""
    import torch.distributed as dist
    from torch.distributed.pipelining import SplitPoint, pipeline

    warnings.simplefilter("ignore", FutureWarning)  # torch's own LeafSpec deprecation, per rank
    try:
        torch.set_num_threads(1)
        model, inputs = build_wrapped(builder_name, builder_kwargs)
        known = dict(model.model.named_modules())
        unknown = [fqn for fqn in split_fqns if fqn not in known]
        if unknown:
            raise ValueError(f"no module {unknown[0]!r} in the {builder_name} sample")
        is_last = rank == world_size - 1
        with torch.no_grad():
            reference = model(*inputs) if is_last else None
            pipe = pipeline(
                model, mb_args=_microbatches_of(inputs, microbatches),
                split_spec={f"model.{fqn}": SplitPoint.BEGINNING for fqn in split_fqns},
            )
            if pipe.num_stages != world_size:
                raise ValueError(f"split gave {pipe.num_stages} stages, not {world_size}")
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                world_size=world_size, timeout=timedelta(seconds=timeout_s),
            )
            stage = pipe.build_stage(rank, device=torch.device("cpu"))
            del pipe
            for mode in MODES:
                _run_mode(stage, mode, inputs, WARMUP_REQUESTS, microbatches)
            report: dict[str, Any] = {"ok": True}
            for mode in MODES:
                run = _run_mode(stage, mode, inputs, requests, microbatches)
                report[mode] = {"began": run["began"], "ended": run["ended"]}
                if is_last:
                    first = run["output"][: inputs[0].shape[0]]
                    report[mode]["matches"] = bool(torch.allclose(first, reference, atol=1e-4))
        results.put((rank, report))
    except Exception as error:  # noqa: BLE001 - reported to the parent, which never raises
        results.put((rank, {"ok": False, "error": error_line(error)}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def measure_peer(
    builder_name: str, builder_kwargs: dict, split_fqns: list[str], *, requests: int,
    microbatches: int, port: int | None = None, timeout_s: float = 300,
) -> dict:
    """Throughput of ``torch.distributed.pipelining`` on one host, one process per stage.

    ``split_fqns`` name modules of the sample model itself (``"h.4"`` for GPT-2, not
    ``"model.h.4"``); a new stage begins at each. Spawns ``len(split_fqns) + 1`` ranks on
    gloo over 127.0.0.1. The headline ``throughput_per_s`` (requests/s) is the ``stream``
    mode; ``modes`` holds both modes (see the module docstring). ``matches`` is whether the
    pipelined output of the first request equals the single-process output (atol 1e-4) in
    every mode. Never raises for a pipelining failure: returns ``{"ok": False, "error": ...}``.
    """
    world_size = len(split_fqns) + 1
    base = {"requests": requests, "microbatches": microbatches, "world_size": world_size,
            "split": list(split_fqns), "torch": torch.__version__}
    args = (world_size, port or free_ports(1)[0], builder_name, builder_kwargs, list(split_fqns),
            requests, microbatches, timeout_s)
    reports = run_processes(_rank_worker, [args] * world_size, timeout_s)
    if not reports[0]["ok"]:
        return {**base, "ok": False, "error": reports[0]["error"]}
    first, last = reports[0], reports[-1]
    modes = {}
    for mode in MODES:
        seconds = last[mode]["ended"] - first[mode]["began"]
        modes[mode] = {"seconds": seconds, "throughput_per_s": requests / seconds,
                       "matches": last[mode]["matches"]}
    headline = modes[HEADLINE_MODE]
    return {**base, "ok": True, "mode": HEADLINE_MODE, "seconds": headline["seconds"],
            "throughput_per_s": headline["throughput_per_s"],
            "matches": all(mode["matches"] for mode in modes.values()), "modes": modes}


def measure_case(model: str, requests: int, microbatches: int) -> list[dict]:
    """The CLI's rows for one model: single process with 1 and 2 threads, then pipelining."""
    kwargs, split = CASES[model]
    rows = []
    for threads in (1, 2):
        result = measure_single_process(model, kwargs, threads=threads, requests=requests)
        runner = f"single process, {threads} thread{'s' if threads > 1 else ''}"
        rows.append({"model": model, "runner": runner, **result})
    peer = measure_peer(model, kwargs, split, requests=requests, microbatches=microbatches)
    if not peer["ok"]:
        return [*rows, {"model": model, "runner": "torch pipelining", **peer}]
    for mode, result in peer["modes"].items():
        rows.append({"model": model, "runner": f"torch pipelining, {mode}",
                     **{key: value for key, value in peer.items() if key != "modes"}, **result})
    return rows


def print_rows(rows: list[dict]) -> None:
    """Print the rows as an aligned table; ratio is over the model's 2-thread single process."""
    header = (f"{'model':<7} {'runner':<34} {'split':<22} {'req/s':>7} {'ratio':>6} "
              f"{'matches':>7}  error")
    print(header)
    print("-" * len(header))
    for row in rows:
        reference = next(r for r in rows if r["model"] == row["model"] and r.get("threads") == 2)
        split = ",".join(row.get("split", [])) or "-"
        if row["ok"]:
            ratio = (f"{row['throughput_per_s'] / reference['throughput_per_s']:>6.2f}"
                     if reference["ok"] else f"{'-':>6}")
            matches = {True: "yes", False: "NO"}.get(row.get("matches"), "-")
            print(f"{row['model']:<7} {row['runner']:<34} {split:<22} "
                  f"{row['throughput_per_s']:>7.2f} {ratio} {matches:>7}")
        else:
            print(f"{row['model']:<7} {row['runner']:<34} {split:<22} {'-':>7} {'-':>6} "
                  f"{'-':>7}  {row['error']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--microbatches", type=int, default=1,
                        help="microbatches per request (default: 1)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()

    began, load = time.monotonic(), os.getloadavg()[0]
    rows = [row for model in args.model
            for row in measure_case(model, args.requests, args.microbatches)]
    print_rows(rows)
    print(f"\ntorch {torch.__version__}, {args.requests} requests, {args.microbatches} "
          f"microbatch(es) per request, {os.cpu_count()} cores, load average {load:.1f} at "
          f"start and {os.getloadavg()[0]:.1f} at the end, {time.monotonic() - began:.0f}s in all")
    if load > 0.5:
        print("warning: other processes were running; with them a 2-thread process can be "
              "many times slower than a 1-thread one, so measure on an idle machine")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"machine": platform.platform(), "processor": platform.processor(),
                       "cores": os.cpu_count(), "load_average_at_start": load,
                       "requests": args.requests, "microbatches": args.microbatches,
                       "rows": rows}, out, indent=2)


if __name__ == "__main__":
    main()
