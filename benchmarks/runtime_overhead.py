"""Per-frame overhead of the node's data path against raw gRPC, between two real processes.

For each activation size, a client sends a frame to an echo server in another process on
127.0.0.1 and gets it back: once as raw bytes through ``grpc.aio`` (identity serializers),
once as edgesplit does it (``encode_frame`` -> ``read_frame`` -> ``decode_frame`` on each
side). Both use the same gRPC options. One hop is half a round trip; the table shows the
median round trip of each and the per-hop overhead of ours.

With ``--tls`` a second table adds, from fresh certificates and a token made by
``coordinator certs``' code, raw bytes over a mutual-TLS channel (no token, no interceptor)
and the frame path as the cluster secures it: ``open_channel`` with the coordinator's
credentials, to a port with a node's TLS credentials and ``AuthInterceptor`` (the echo
answers at ``Submit``'s path, which the role table lets the coordinator call). Its last two
columns are ours against raw, both over TLS, and what TLS and the token add to ours, per hop.

    .venv/bin/python benchmarks/runtime_overhead.py [--sizes '4 KB' '1 MB' ...] [--tls]
        [--repeats N] [--json out.json] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import report
import torch

from coordinator.certs import make_certs, node_arguments
from coordinator.ports import free_ports
from node.auth import AuthInterceptor, WiredPeers
from node.channels import channel_credentials, channel_options, open_channel
from node.codec import WireFrame, decode_frame, encode_frame, read_frame
from node.data_path import SERVICE, method_path
from node.rpc_options import grpc_options, server_options
from node.security import Security, client_security, load_security, server_credentials
from partition.allocator import keep_large_buffers
from partition.cluster import ClusterSpec, NodeSpec

SIZES = {"4 KB": 4 << 10, "64 KB": 64 << 10, "1 MB": 1 << 20, "16 MB": 16 << 20, "64 MB": 64 << 20}
TARGET_BYTES_PER_SIZE = 512 << 20
"""Bytes moved per size and method; sets the repeat count (at least MIN_REPEATS)."""
MIN_REPEATS = 8
MAX_REPEATS = 2000
BENCH_SERVICE = "edgesplit.bench.Echo"
RAW_METHOD = f"/{BENCH_SERVICE}/Raw"
FRAME_METHOD = f"/{BENCH_SERVICE}/Frame"
NODE = "bench-node"
"""The node named by the echo server's certificate with ``--tls``."""
HEADER = (f"{'size':>6} {'repeats':>7} {'raw RTT ms':>11} {'ours RTT ms':>12} "
          f"{'ours-raw /hop ms':>17}")
TLS_HEADER = (f"{'size':>6} {'repeats':>7} {'raw RTT ms':>11} {'ours RTT ms':>12} "
              f"{'TLS raw RTT ms':>15} {'TLS+token ours RTT ms':>22} "
              f"{'TLS ours-raw /hop ms':>21} {'TLS+token cost /hop ms':>23}")

Echo = Callable[[torch.Tensor, bytes], Awaitable[None]]
"""One round trip of a tensor (and the same tensor's bytes) to the echo server."""


async def _raw(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return data


async def _frame(msg: WireFrame, context: grpc.aio.ServicerContext) -> bytes:
    request_id, tensors = decode_frame(msg.header, msg.payload)
    return encode_frame(request_id, tensors)


RAW_HANDLER = grpc.unary_unary_rpc_method_handler(_raw)
FRAME_HANDLER = grpc.unary_unary_rpc_method_handler(
    _frame,
    request_deserializer=read_frame,
    response_serializer=None,  # encode_frame gives a serialized Frame
)


async def _echo_server(
    port: int,
    service: str,
    handlers: dict[str, grpc.RpcMethodHandler],
    security: Security | None = None,
    interceptors: list[grpc.aio.ServerInterceptor] | None = None,
) -> grpc.aio.Server:
    """A started server of ``handlers`` on 127.0.0.1:``port``, with TLS if ``security``."""
    server = grpc.aio.server(options=server_options(), interceptors=interceptors)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    address = f"127.0.0.1:{port}"
    if security is None:
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, server_credentials(security))
    await server.start()
    return server


async def _serve(ports: list[int], security: Security | None) -> None:
    """The plain echo server; with ``security`` also the TLS one and the secured one, as a
    node's port is (its TLS credentials and ``AuthInterceptor``)."""
    servers = [await _echo_server(ports[0], BENCH_SERVICE,
                                  {"Raw": RAW_HANDLER, "Frame": FRAME_HANDLER})]
    if security is not None:
        tls_port, secured_port = ports[1:]
        servers.append(await _echo_server(tls_port, BENCH_SERVICE, {"Raw": RAW_HANDLER},
                                          security))
        servers.append(await _echo_server(
            secured_port, SERVICE.full_name, {"Submit": FRAME_HANDLER}, security,
            [AuthInterceptor(security, WiredPeers())],
        ))
    await servers[0].wait_for_termination()


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


def _raw_echo(channel: grpc.aio.Channel, method: str) -> Echo:
    raw = channel.unary_unary(method)

    async def echo(tensor: torch.Tensor, data: bytes) -> None:
        await raw(data)

    return echo


def _frame_echo(channel: grpc.aio.Channel, method: str) -> Echo:
    framed = channel.unary_unary(method, request_serializer=None, response_deserializer=read_frame)

    async def echo(tensor: torch.Tensor, data: bytes) -> None:
        reply = await framed(encode_frame(1, {"x": tensor}))
        decode_frame(reply.header, reply.payload)

    return echo


async def _measure(
    ports: list[int], sizes: list[str], repeats: int | None, security: Security | None
) -> list[dict[str, float | str]]:
    """Each size's median round trip by each echo (``raw``, ``ours``, and with ``security``
    ``tls_raw`` and ``tls_ours``), in ms, and the per-hop differences."""
    async with contextlib.AsyncExitStack() as stack:
        plain = grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}", options=grpc_options())
        echoes = {"raw": _raw_echo(plain, RAW_METHOD), "ours": _frame_echo(plain, FRAME_METHOD)}
        channels = [plain]
        if security is not None:
            tls = grpc.aio.secure_channel(f"127.0.0.1:{ports[1]}", channel_credentials(security),
                                          channel_options(security, NODE))
            secured = open_channel(f"127.0.0.1:{ports[2]}", security, server_name=NODE)
            echoes |= {"tls_raw": _raw_echo(tls, RAW_METHOD),
                       "tls_ours": _frame_echo(secured, method_path("Submit"))}
            channels += [tls, secured]
        for channel in channels:
            await stack.enter_async_context(channel)
            await channel.channel_ready()
        rows = []
        for label in sizes:
            nbytes = SIZES[label]
            tensor = torch.randn(nbytes // 4)
            data = tensor.numpy().tobytes()
            count = repeats or min(MAX_REPEATS, max(MIN_REPEATS, TARGET_BYTES_PER_SIZE // nbytes))
            row: dict[str, float | str] = {"size": label, "bytes": nbytes, "repeats": count}
            for name, echo in echoes.items():
                seconds = await _time(functools.partial(echo, tensor, data), count)
                row[f"{name}_round_trip_ms"] = seconds * 1e3
            row["overhead_per_hop_ms"] = _per_hop(row, "ours", "raw")
            if security is not None:
                row["tls_overhead_per_hop_ms"] = _per_hop(row, "tls_ours", "tls_raw")
                row["tls_token_cost_per_hop_ms"] = _per_hop(row, "tls_ours", "ours")
            rows.append(row)
    return rows


def _per_hop(row: dict[str, float | str], slower: str, faster: str) -> float:
    """Half the difference of two round trips of ``row``: what ``slower`` adds to a hop."""
    return (float(row[f"{slower}_round_trip_ms"]) - float(row[f"{faster}_round_trip_ms"])) / 2


def row_line(row: dict[str, float | str]) -> str:
    """One size's row of the table under :data:`HEADER`."""
    return (f"{row['size']:>6} {row['repeats']:>7} {row['raw_round_trip_ms']:>11.3f} "
            f"{row['ours_round_trip_ms']:>12.3f} {row['overhead_per_hop_ms']:>17.3f}")


def tls_row_line(row: dict[str, float | str]) -> str:
    """One size's row of the table under :data:`TLS_HEADER`."""
    return (f"{row['size']:>6} {row['repeats']:>7} {row['raw_round_trip_ms']:>11.3f} "
            f"{row['ours_round_trip_ms']:>12.3f} {row['tls_raw_round_trip_ms']:>15.3f} "
            f"{row['tls_ours_round_trip_ms']:>22.3f} {row['tls_overhead_per_hop_ms']:>21.3f} "
            f"{row['tls_token_cost_per_hop_ms']:>23.3f}")


def _run(sizes: list[str], repeats: int | None, tls: bool) -> list[dict[str, float | str]]:
    """Start the echo server process (with ``tls``, on fresh credentials) and measure."""
    with tempfile.TemporaryDirectory(prefix="edgesplit-bench-") as tmp:
        ports = free_ports(3 if tls else 1)
        command = [sys.executable, __file__, "--serve", *map(str, ports)]
        security = None
        if tls:
            node = NodeSpec(NODE, f"127.0.0.1:{ports[2]}", memory_bytes=0)
            spec = make_certs(Path(tmp) / "certs", ClusterSpec(
                nodes=(node,), default_link=None, links={}, source=NODE, sink=NODE))
            command += node_arguments(spec, NODE)  # as a node of this cluster is started
            security = client_security(spec)  # as the coordinator holds them
        server = subprocess.Popen(command)
        try:
            return asyncio.run(_measure(ports, sizes, repeats, security))
        finally:
            server.terminate()
            server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES),
                        metavar="SIZE", help=f"frame sizes to send, of: {', '.join(SIZES)}")
    parser.add_argument("--tls", action="store_true",
                        help="also measure over mutual TLS, raw and with the cluster token")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help="round trips per size and method (default: enough to move "
                             f"{TARGET_BYTES_PER_SIZE >> 20} MB, {MIN_REPEATS} to {MAX_REPEATS})")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--serve", type=int, nargs="+", metavar="PORT", help=argparse.SUPPRESS)
    for option in ("--tls-cert", "--tls-key", "--tls-ca", "--token-file"):  # edge-node's
        parser.add_argument(option, help=argparse.SUPPRESS)
    report.add_markdown_option(parser)
    args = parser.parse_args()
    keep_large_buffers()  # as edge-node and coordinator do
    if args.serve:
        security = load_security(token_file=args.token_file, ca=args.tls_ca, cert=args.tls_cert,
                                 key=args.tls_key)
        asyncio.run(_serve(args.serve, security))
        return
    with report.usual_output(args.markdown):
        rows = _run(args.sizes, args.repeats, args.tls)
        tables = [[HEADER, *map(row_line, rows)]]
        if args.tls:
            tables.append([TLS_HEADER, *map(tls_row_line, rows)])
        print("\n\n".join("\n".join(lines) for lines in tables))
    if args.markdown:
        print(report.markdown(*tables))
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
