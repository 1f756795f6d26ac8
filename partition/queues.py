"""How many frames a worker holds for its stage: the worker's queue sizes, and what the
planner counts for them in a stage's memory (one module, so the two cannot disagree)."""

from __future__ import annotations

QUEUE_DEPTH = 4
"""Frames each of a worker's queues holds before the side feeding it has to wait: received
frames waiting for the stage, output frames waiting for the link, results waiting for their
reader."""

FRAMES_HELD = QUEUE_DEPTH + 2
"""Frames a worker may hold on each side of its stage: a full queue, the one being worked on
(computed, or sent) and the one waiting for room in the queue."""

RESULTS_HELD = QUEUE_DEPTH + 1
"""Frames the last stage's node holds besides: a full results buffer and the one being
written to the reader."""


def held_frames_bytes(receives_bytes: int, sends_bytes: int, *, last: bool) -> int:
    """Bytes of the frames a stage's node may hold at once, for a stage that receives and
    sends frames of these sizes (raw: a compressed link only makes them smaller).

    >>> held_frames_bytes(100, 10, last=False)
    660
    >>> held_frames_bytes(100, 10, last=True)
    710
    """
    return FRAMES_HELD * (receives_bytes + sends_bytes) + (RESULTS_HELD * sends_bytes
                                                           if last else 0)
