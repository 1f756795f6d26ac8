"""How many frames a worker holds for its stage: the worker's queue sizes, and what the
planner counts for them in a stage's memory (one module, so the two cannot disagree)."""

from __future__ import annotations

QUEUE_DEPTH = 4
"""Frames each of a worker's queues holds before the side feeding it has to wait: received
frames waiting for the stage, output frames waiting for the link, results waiting for their
reader."""

IN_FLIGHT_FRAMES = 16
"""Frames the emulated outbound link holds between leaving this node and arriving (its
latency) before the send loop waits, like a transport's window: twice the coordinator's
default window of requests in flight, so the emulated latency does not limit throughput."""

FRAMES_HELD_IN = QUEUE_DEPTH + 2
"""Received frames a worker may hold: a full queue, the one its stage is computing and the
one the receiver holds while it waits for room."""

FRAMES_HELD_OUT = QUEUE_DEPTH + IN_FLIGHT_FRAMES + 3
"""Output frames a worker may hold: a full queue, the frames in flight over the outbound
link, and the one waiting for room before each of those and before the sink."""

RESULTS_HELD = QUEUE_DEPTH + 1
"""Frames the last stage's node holds besides: a full results buffer and the one being
written to the reader."""


def held_frames_bytes(receives_bytes: int, sends_bytes: int, *, last: bool) -> int:
    """Bytes of the frames a stage's node may hold at once, for a stage that receives and
    sends frames of these sizes (raw: a compressed link only makes them smaller).

    >>> held_frames_bytes(100, 10, last=False)
    830
    >>> held_frames_bytes(100, 10, last=True)
    880
    """
    held = FRAMES_HELD_IN * receives_bytes + FRAMES_HELD_OUT * sends_bytes
    return held + (RESULTS_HELD * sends_bytes if last else 0)
