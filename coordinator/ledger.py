"""Every request a pipeline accepted, until it is answered exactly once.

A request is sent under a fresh *wire id* each time (first send, and each replay after a
switch of plan): 52 random bits, so nobody can guess the id of another client's request,
then the plan version, so every frame carries the request and the plan version it was sent
under. An answer counts if its request is still waiting:
outputs from any version (the old chain computed the same function), a failure only from
the current version (an old chain's failure is a casualty of the switch; the replay
answers). Everything else arrives late and is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from node.client import Result
from partition.errors import EdgesplitError
from partition.spec import TensorSpec

_RANDOM_BITS = 52
_VERSION_BITS = 12
RECENT_IDS = 1 << 16
"""How many answered wire ids are remembered, to tell a late answer from a stranger's."""


class RequestFailedError(EdgesplitError):
    """A node answered a request with a failure instead of outputs."""


@dataclass(eq=False)
class Request:
    """One accepted request: its inputs, the future its caller awaits, and its sends."""

    number: int
    tensors: dict[str, torch.Tensor]
    answer: asyncio.Future[tuple[torch.Tensor, ...]]
    sent_version: int = -1
    deadline_at: float = math.inf
    timeouts: int = 0
    wire_ids: list[int] = field(default_factory=list)


class Ledger:
    """The requests waiting for an answer, by number and by every wire id they were sent as."""

    def __init__(self, outputs: Sequence[TensorSpec]) -> None:
        self.outputs = tuple(outputs)
        self.version = 0
        self.late = 0
        """Answers dropped because their request had its answer already."""
        self.strays = 0
        """Answers dropped because no request here was ever sent under their id."""
        self._numbers = itertools.count()
        self._retired: OrderedDict[int, None] = OrderedDict()
        self._waiting: dict[int, Request] = {}
        self._by_wire_id: dict[int, Request] = {}

    def accept(self, tensors: dict[str, torch.Tensor]) -> Request:
        request = Request(next(self._numbers), tensors,
                          asyncio.get_running_loop().create_future())
        self._waiting[request.number] = request
        return request

    def new_version(self) -> int:
        """Start a new plan version (a switch, or a reopened data path)."""
        self.version += 1
        return self.version

    def wire_id(self, request: Request, deadline_s: float) -> int:
        """A fresh wire id for sending ``request`` under the current version."""
        while True:
            wire_id = secrets.randbits(_RANDOM_BITS) << _VERSION_BITS | (
                self.version % 2**_VERSION_BITS)
            if wire_id not in self._by_wire_id and wire_id not in self._retired:
                break
        request.wire_ids.append(wire_id)
        request.sent_version = self.version
        request.deadline_at = time.monotonic() + deadline_s
        self._by_wire_id[wire_id] = request
        return wire_id

    def unanswered(self) -> list[Request]:
        return [r for r in self._waiting.values() if not r.answer.done()]

    def forget(self, request: Request) -> None:
        """The caller has its answer: later answers for it are late."""
        self._waiting.pop(request.number, None)
        for wire_id in request.wire_ids:
            self._by_wire_id.pop(wire_id, None)
            self._retired[wire_id] = None
        while len(self._retired) > RECENT_IDS:
            self._retired.popitem(last=False)

    def deliver(self, result: Result) -> Request | None:
        """Answer the request ``result`` belongs to, if it counts; the request answered."""
        request = self._by_wire_id.get(result.request_id)
        if request is None or request.answer.done():
            if request is not None or result.request_id in self._retired:
                self.late += 1
            else:
                self.strays += 1
            return None
        if result.outputs is not None:
            request.answer.set_result(tuple(result.outputs[s.name] for s in self.outputs))
            return request
        if self._version_of(result.request_id) != self.version % 2**_VERSION_BITS:
            return None
        failure = result.failure
        request.answer.set_exception(RequestFailedError(
            f"stage {failure.stage_index} on {failure.node} failed the request: "
            f"{failure.message}"
        ))
        return request

    def fail_all(self, error: EdgesplitError) -> None:
        """Answer every waiting request with ``error``."""
        for request in self.unanswered():
            request.answer.set_exception(error)

    @staticmethod
    def _version_of(wire_id: int) -> int:
        return wire_id % 2**_VERSION_BITS
