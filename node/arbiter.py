"""One shared medium's arbiter: a small process that hands out the medium's airtime.

A simulated cluster (``coordinator up``) starts one per medium of its ``nodes.yaml``;
every worker whose link crosses the medium asks it for airtime before a frame leaves. The
arbiter keeps the medium's schedule with :class:`node.link.LinkSchedule`'s arithmetic:
a reservation starts when it is asked for (``earliest``) or when the medium is free,
whichever is later, and keeps the medium busy ``seconds``. Times are ``time.monotonic``,
which on Linux is one clock for every process of the machine.

The protocol is msgpack over TCP on 127.0.0.1, each message preceded by its length (4
bytes, big-endian): a request ``{"earliest": float, "seconds": float}`` gets
``{"start": float}``, or ``{"error": str}`` when it is malformed or asks for too much (a
frame too long to read closes the connection after that answer).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import struct
import time
from typing import Any

import msgpack

from node.link import NO_EMULATION, LinkSchedule

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256
"""Longest message either side sends (a request is about 30 bytes)."""
MAX_HOLD_S = 60.0
"""Longest airtime one reservation may take, and how far ahead it may start."""
MAX_CONNECTIONS = 256
"""Most connections an arbiter keeps open (one per worker that crosses the medium)."""
IDLE_S = 300.0
"""An arbiter closes a connection that sends nothing for this long (a worker reconnects)."""
_LENGTH = struct.Struct(">I")


def pack(message: dict[str, Any]) -> bytes:
    """``message`` as one length-prefixed frame."""
    body = msgpack.packb(message)
    return _LENGTH.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> bytes:
    """The next frame's body; raises :class:`ValueError` if it is longer than
    :data:`MAX_MESSAGE_BYTES` and :class:`asyncio.IncompleteReadError` at the end."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length > MAX_MESSAGE_BYTES:
        raise ValueError(f"a message of {length} bytes is longer than {MAX_MESSAGE_BYTES}")
    return await reader.readexactly(length)


class Medium:
    """The schedule of one medium's airtime."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._schedule = LinkSchedule(NO_EMULATION)
        self._connections = 0

    def answer(self, body: bytes, now: float) -> dict[str, Any]:
        """The reply to one request's ``body`` received at ``now``: the reservation's start,
        or why it is refused (the schedule is then unchanged)."""
        try:
            request = msgpack.unpackb(body)
        except (ValueError, msgpack.UnpackException) as err:
            return {"error": f"not a msgpack message ({err})"}
        if not isinstance(request, dict) or set(request) != {"earliest", "seconds"}:
            return {"error": "a request is a map of exactly 'earliest' and 'seconds'"}
        earliest, seconds = request["earliest"], request["seconds"]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                   for v in (earliest, seconds)):
            return {"error": "'earliest' and 'seconds' must be finite numbers"}
        if not 0 <= seconds <= MAX_HOLD_S:
            return {"error": f"'seconds' must be within [0, {MAX_HOLD_S:g}], not {seconds!r}"}
        if earliest > now + MAX_HOLD_S:
            return {"error": f"'earliest' is more than {MAX_HOLD_S:g} s ahead"}
        end = self._schedule.reserve(float(earliest), float(seconds))
        return {"start": end - seconds}

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer one worker's requests until it hangs up, idles for :data:`IDLE_S` or
        sends a frame too long; beyond :data:`MAX_CONNECTIONS` a connection is refused."""
        if self._connections >= MAX_CONNECTIONS:
            writer.write(pack({"error": f"this arbiter serves {MAX_CONNECTIONS} connections "
                                        "already"}))
            writer.close()
            return
        self._connections += 1
        try:
            while True:
                try:
                    async with asyncio.timeout(IDLE_S):
                        body = await read_message(reader)
                except ValueError as err:
                    writer.write(pack({"error": str(err)}))
                    await writer.drain()
                    return
                writer.write(pack(self.answer(body, time.monotonic())))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            self._connections -= 1
            writer.close()


async def serve(listen: str, name: str) -> None:
    """Serve medium ``name`` on ``listen`` (``host:port``) until cancelled."""
    host, _, port = listen.rpartition(":")
    medium = Medium(name)
    server = await asyncio.start_server(medium.serve_connection, host, int(port))
    log.info("medium %s: arbiter listening on %s", name, listen)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    """``python -m node.arbiter --listen HOST:PORT --medium NAME``."""
    parser = argparse.ArgumentParser(description="hand out one shared medium's airtime")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--medium", required=True, metavar="NAME")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.medium))


if __name__ == "__main__":
    main()
