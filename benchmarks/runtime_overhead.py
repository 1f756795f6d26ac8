"""Per-frame overhead of the node's data path against raw gRPC, between two real processes.

For each activation size, a client sends a frame to an echo server in another process on
127.0.0.1 and gets it back: once as raw bytes through ``grpc.aio`` (identity serializers),
once as edgesplit does it (``encode_frame`` -> ``read_frame`` -> ``decode_frame`` on each
side). Both use the same gRPC options. One hop is half a round trip; the table shows the
median round trip of each and the per-hop overhead of ours.

    .venv/bin/python benchmarks/runtime_overhead.py [--sizes '4 KB' '1 MB' ...] [--json out.json]
        [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import report
import torch

from coordinator.ports import free_ports
from node.codec import WireFrame, decode_frame, encode_frame, read_frame
from node.rpc_options import grpc_options, server_options
from partition.allocator import keep_large_buffers

SIZES = {"4 KB": 4 << 10, "64 KB": 64 << 10, "1 MB": 1 << 20, "16 MB": 16 << 20, "64 MB": 64 << 20}
TARGET_BYTES_PER_SIZE = 512 << 20
"""Bytes moved per size and method; sets the repeat count (at least MIN_REPEATS)."""
MIN_REPEATS = 8
MAX_REPEATS = 2000
RAW_METHOD = "/edgesplit.bench.Echo/Raw"
FRAME_METHOD = "/edgesplit.bench.Echo/Frame"
HEADER = (f"{'size':>6} {'repeats':>7} {'raw RTT ms':>11} {'ours RTT ms':>12} "
          f"{'ours-raw /hop ms':>17}")


async def _serve(port: int) -> None:
    async def raw(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return data

    async def frame(msg: WireFrame, context: grpc.aio.ServicerContext) -> bytes:
        request_id, tensors = decode_frame(msg.header, msg.payload)
        return encode_frame(request_id, tensors)

    handlers = grpc.method_handlers_generic_handler(
        "edgesplit.bench.Echo",
        {
            "Raw": grpc.unary_unary_rpc_method_handler(raw),
            "Frame": grpc.unary_unary_rpc_method_handler(
                frame,
                request_deserializer=read_frame,
                response_serializer=None,  # encode_frame gives a serialized Frame
            ),
        },
    )
    server = grpc.aio.server(options=server_options())
    server.add_generic_rpc_handlers((handlers,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def _time(call, repeats: int) -> float:
    """Median seconds of ``await call()`` over ``repeats`` runs, after two warm-ups."""
    for _ in range(2):
        await call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def _measure(address: str, sizes: list[str]) -> list[dict[str, float | str]]:
    rows = []
    async with grpc.aio.insecure_channel(address, options=grpc_options()) as channel:
        await channel.channel_ready()
        raw = channel.unary_unary(RAW_METHOD)
        framed = channel.unary_unary(
            FRAME_METHOD,
            request_serializer=None,
            response_deserializer=read_frame,
        )
        for label in sizes:
            nbytes = SIZES[label]
            tensor = torch.randn(nbytes // 4)
            data = tensor.numpy().tobytes()
            repeats = min(MAX_REPEATS, max(MIN_REPEATS, TARGET_BYTES_PER_SIZE // nbytes))

            async def raw_call(data: bytes = data) -> None:
                await raw(data)

            async def frame_call(tensor: torch.Tensor = tensor) -> None:
                reply = await framed(encode_frame(1, {"x": tensor}))
                decode_frame(reply.header, reply.payload)

            raw_s = await _time(raw_call, repeats)
            ours_s = await _time(frame_call, repeats)
            rows.append(
                {
                    "size": label,
                    "bytes": nbytes,
                    "repeats": repeats,
                    "raw_round_trip_ms": raw_s * 1e3,
                    "ours_round_trip_ms": ours_s * 1e3,
                    "overhead_per_hop_ms": (ours_s - raw_s) / 2 * 1e3,
                }
            )
    return rows


def row_line(row: dict[str, float | str]) -> str:
    """One size's row of the table under :data:`HEADER`."""
    return (f"{row['size']:>6} {row['repeats']:>7} {row['raw_round_trip_ms']:>11.3f} "
            f"{row['ours_round_trip_ms']:>12.3f} {row['overhead_per_hop_ms']:>17.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES),
                        metavar="SIZE", help=f"frame sizes to send, of: {', '.join(SIZES)}")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    report.add_markdown_option(parser)
    args = parser.parse_args()
    keep_large_buffers()  # as edge-node and coordinator do
    if args.serve:
        asyncio.run(_serve(args.serve))
        return
    with report.usual_output(args.markdown):
        (port,) = free_ports(1)
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
        try:
            rows = asyncio.run(_measure(f"127.0.0.1:{port}", args.sizes))
        finally:
            server.terminate()
            server.wait(10)
        lines = [HEADER, *map(row_line, rows)]
        print("\n".join(lines))
    if args.markdown:
        print(report.markdown(lines))
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
