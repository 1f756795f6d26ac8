"""``edge-node``: run one worker process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from dataclasses import replace

from node.config import (
    RESULTS_STALL_S,
    UPLOAD_STALL_S,
    Device,
    NodeConfig,
    best_device,
    default_max_stage_bytes,
)
from node.rpc_options import MAX_MESSAGE_BYTES
from node.security import load_security
from node.server import serve
from partition.allocator import keep_large_buffers
from partition.errors import EdgesplitError
from partition.units import parse_size


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-node", description="Run one edgesplit worker: it serves a pipeline stage."
    )
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to serve")
    parser.add_argument("--name", help="node name shown to the coordinator (default: HOST:PORT)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--device",
        type=Device,
        choices=list(Device),
        default=best_device(),
        help="where the stage runs (default: the best available)",
    )
    parser.add_argument(
        "--speed-factor",
        type=float,
        default=1.0,
        help="emulate a slower device: 0.5 makes compute take twice as long (default 1)",
    )
    parser.add_argument(
        "--medium", action="append", default=[], metavar="NAME=HOST:PORT", type=_medium,
        help="the arbiter of a shared medium this node's emulated links may cross "
             "(repeatable; `coordinator up` passes them)",
    )
    _add_limits(parser.add_argument_group("limits on what callers may send"))
    _add_security(parser.add_argument_group("security (see README, Security)"))
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default INFO",
    )
    return parser



def _medium(value: str) -> tuple[str, str]:
    """``NAME=HOST:PORT`` as ``(name, address)``."""
    name, _, address = value.partition("=")
    if not name or ":" not in address:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=HOST:PORT (example: "
                                         "wifi=127.0.0.1:50100)")
    return name, address


def _add_limits(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--max-stage-bytes",
        type=parse_size,
        default=default_max_stage_bytes(),
        metavar="SIZE",
        help="largest stage artifact or model file accepted, e.g. 2GiB (default: half of RAM)",
    )
    group.add_argument(
        "--max-frame-bytes",
        type=parse_size,
        default=MAX_MESSAGE_BYTES,
        metavar="SIZE",
        help="largest frame (gRPC message) accepted, e.g. 64MiB; a larger one closes its "
        f"stream before it is read (default {MAX_MESSAGE_BYTES // 1024**2}MiB)",
    )
    group.add_argument(
        "--upload-stall-s",
        type=float,
        default=UPLOAD_STALL_S,
        metavar="SECONDS",
        help=f"cancel an upload that sends no chunk for this long (default {UPLOAD_STALL_S:g})",
    )
    group.add_argument(
        "--results-stall-s",
        type=float,
        default=RESULTS_STALL_S,
        metavar="SECONDS",
        help="cut off a Results reader that reads nothing for this long while results wait "
        f"(default {RESULTS_STALL_S:g})",
    )


def _add_security(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--token-file", metavar="PATH", help="the cluster token; every call must carry it"
    )
    group.add_argument("--tls-cert", metavar="PATH", help="this node's certificate (PEM)")
    group.add_argument("--tls-key", metavar="PATH", help="this node's private key (PEM)")
    group.add_argument(
        "--tls-ca", metavar="PATH",
        help="the cluster's CA certificate: callers must show a certificate it signed",
    )

def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``edge-node`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    keep_large_buffers()
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = NodeConfig(
            listen=args.listen,
            name=args.name or f"{socket.gethostname()}:{args.listen.rpartition(':')[2]}",
            threads=args.threads,
            device=args.device,
            speed_factor=args.speed_factor,
            upload_stall_s=args.upload_stall_s,
            results_stall_s=args.results_stall_s,
            max_stage_bytes=args.max_stage_bytes,
            max_message_bytes=args.max_frame_bytes,
            media=dict(args.medium),
        )
    except ValueError as err:
        parser.error(str(err))
    try:
        security = load_security(
            token_file=args.token_file, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key
        )
        asyncio.run(serve(replace(config, security=security)))
    except EdgesplitError as err:
        print(f"edge-node: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
