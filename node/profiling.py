"""Profiling a model on this node, as the node's (possibly emulated) device would.

A node profiles one model at a time, in a daemon thread: a second ``Profile`` call is
refused while one runs, and a node told to stop does not wait for a profile to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from node.errors import ArtifactError, LimitError
from node.limits import check_within
from node.loading import collect_upload, next_chunk
from node.rpc import edgesplit_pb2 as pb
from node.sysinfo import cpu_count
from partition.profile_store import profile_model_bytes
from partition.profiler import Profile

MAX_REPEATS = 1000
"""Most timed runs per layer a node performs for one ``Profile`` call."""

MAX_WARMUP = 100
"""Most untimed runs per layer a node performs first."""


@dataclass(frozen=True)
class ProfileOptions:
    """How to profile: the layer granularity, torch threads, timed repeats and warm-ups."""

    granularity: str
    threads: int
    repeats: int
    warmup: int

    def check(self, max_threads: int) -> None:
        """Refuse options that would tie the node up: :class:`LimitError` naming the field."""
        check_within("Profile", (
            ("threads", self.threads, 1, max_threads),
            ("repeats", self.repeats, 1, MAX_REPEATS),
            ("warmup", self.warmup, 0, MAX_WARMUP),
        ))


class NodeProfiler:
    """Profiles model files sent to this node, one at a time, in a daemon thread."""

    def __init__(self, *, speed_factor: float, max_bytes: int, stall_s: float) -> None:
        self._speed_factor = speed_factor
        self._max_bytes = max_bytes
        self._stall_s = stall_s
        self._busy = False

    async def profile(self, chunks: AsyncIterator[pb.ProfileChunk]) -> dict[str, Any]:
        """Receive a ``Profile`` stream and profile its model; the profile's dict.

        Raises
        ------
        LimitError
            If a profile is already running here, the options exceed the node's bounds,
            or the upload breaks a limit (see :func:`receive_model`).
        ArtifactError, ModelLoadError
            If the stream or the model file is malformed.
        """
        if self._busy:
            raise LimitError(
                "this node is already profiling a model; wait for that Profile call to finish"
            )
        self._busy = True
        try:
            options, data = await receive_model(
                chunks, max_bytes=self._max_bytes, stall_s=self._stall_s
            )
            answer = self._start(data, options)
        except BaseException:
            self._busy = False
            raise
        return await answer

    def _start(self, data: bytes, options: ProfileOptions) -> asyncio.Future[dict[str, Any]]:
        """Profile in a daemon thread; the future is set, and the node free again, after."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[dict[str, Any]] = loop.create_future()

        def finish(result: dict[str, Any] | None, error: BaseException | None) -> None:
            self._busy = False
            if answer.done():  # the call was cancelled meanwhile
                return
            if error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(result)

        def work() -> None:
            result, error = None, None
            try:
                result = profile_on_node(data, options, self._speed_factor)
            except BaseException as err:  # handed to the awaiting call
                error = err
            with contextlib.suppress(RuntimeError):  # the loop closed: the node stopped
                loop.call_soon_threadsafe(finish, result, error)

        threading.Thread(target=work, name="profile", daemon=True).start()
        return answer


async def receive_model(
    chunks: AsyncIterator[pb.ProfileChunk], *, max_bytes: int, stall_s: float
) -> tuple[ProfileOptions, bytes]:
    """Collect a ``Profile`` stream into ``(options, model file bytes)``.

    Raises
    ------
    LimitError
        If the options exceed the node's bounds, the file grows past ``max_bytes``, or the
        stream stalls for ``stall_s`` seconds.
    ArtifactError
        If the first chunk carries no options.
    """
    first = await next_chunk(chunks, stall_s)
    if first is None or not first.HasField("options"):
        raise ArtifactError("Profile stream must start with a chunk carrying the options")
    msg = first.options
    options = ProfileOptions(msg.granularity, msg.threads, msg.repeats, msg.warmup)
    options.check(max_threads=cpu_count())
    data = await collect_upload(
        first.data, chunks, max_bytes=max_bytes, stall_s=stall_s,
        too_long=f"the model file is larger than this node's limit of {max_bytes} bytes "
        "(edge-node --max-stage-bytes)",
    )
    return options, data


def profile_on_node(data: bytes, options: ProfileOptions, speed_factor: float) -> dict[str, Any]:
    """Profile the model file ``data`` here, scaled to the emulated speed (blocking)."""
    profile = profile_model_bytes(
        data,
        granularity=options.granularity,
        threads=options.threads,
        repeats=options.repeats,
        warmup=options.warmup,
    )
    return scale_profile(profile, speed_factor)


def scale_profile(profile: dict[str, Any], speed_factor: float) -> dict[str, Any]:
    """The profile a device ``speed_factor`` times as fast would measure (emulation)."""
    if speed_factor == 1:
        return profile
    return Profile.from_dict(profile).scaled(speed_factor).to_dict()
