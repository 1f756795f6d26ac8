"""``edge-node``: run one worker process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from dataclasses import replace

from node.config import Device, NodeConfig, best_device
from node.security import load_security
from node.server import serve
from partition.allocator import keep_large_buffers
from partition.errors import EdgesplitError


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
        "--token-file", metavar="PATH", help="the cluster token; every call must carry it"
    )
    parser.add_argument("--tls-cert", metavar="PATH", help="this node's certificate (PEM)")
    parser.add_argument("--tls-key", metavar="PATH", help="this node's private key (PEM)")
    parser.add_argument(
        "--tls-ca", metavar="PATH",
        help="the cluster's CA certificate: callers must show a certificate it signed",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default INFO",
    )
    return parser


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
