"""Errors of the worker and of talking to workers; each message says what to do."""

from __future__ import annotations

from partition.errors import EdgesplitError, TensorSpecError


class FrameError(EdgesplitError):
    """A frame is malformed: bad header, unknown dtype, or lengths that disagree."""


class FrameSpecError(TensorSpecError):
    """A well-formed frame does not match the tensors a stage expects."""

    def __init__(self, request_id: int, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id


class NodeUnreachableError(EdgesplitError):
    """A node did not answer: it is down, or the address is wrong."""


class NodeRejectedError(EdgesplitError):
    """A node answered a call with an error (bad artifact, bad frame, nothing loaded...)."""


class ArtifactError(EdgesplitError):
    """A stage artifact arrived incomplete, oversized, or with the wrong hash."""


class LimitError(EdgesplitError):
    """A call exceeds one of the node's limits: a size, a count, a time, or one at a time."""


class ListenError(EdgesplitError):
    """The node cannot listen on the address it was given."""


class SecurityConfigError(EdgesplitError):
    """A credential file (token, certificate, key, CA) is missing, unreadable or malformed."""


class ProbeError(EdgesplitError):
    """A probe's target did not answer, or stopped answering, its ``Echo`` calls."""
