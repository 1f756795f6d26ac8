"""Small hand-written modules the tests pickle, export or split.

They live in an importable module (the tests directory is on ``sys.path``, see
``tests/conftest.py``) so that ``torch.load`` can find their classes when unpickling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.pipelining import pipe_split

from partition.loader import LoadedModel

UNPICKLED: list[str] = []
"""Names of :class:`Tripwire` modules that were unpickled (their code ran)."""


class DataDependent(torch.nn.Module):
    """Branches on a tensor's value, which ``torch.export`` cannot trace."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if y.sum() > 0:
            return y * 2
        return y


class Tripwire(torch.nn.Module):
    """Records in :data:`UNPICKLED` whenever an instance is unpickled."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        UNPICKLED.append(type(self).__name__)


class NotAModule:
    """A plain object that needs its class to unpickle."""

    def __init__(self) -> None:
        self.weights = [1.0, 2.0]


class GradRegion(torch.nn.Module):
    """Computes a rotary-style table under ``@torch.no_grad()``, as older rotary embeddings
    did: exported with gradients enabled, that region becomes a
    ``wrap_with_set_grad_enabled`` sub-graph."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)
        self.register_buffer("inv_freq", torch.arange(1.0, width // 2 + 1.0))

    @torch.no_grad()
    def table(self, x: torch.Tensor) -> torch.Tensor:
        freqs = x[..., : self.inv_freq.shape[0]] * self.inv_freq
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.table(x)


class PipeSplit(torch.nn.Module):
    """Three blocks with a ``pipe_split()`` marker after the first and after the second."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.block1 = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU())
        self.block2 = torch.nn.Sequential(
            torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width)
        )
        self.block3 = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(x)
        pipe_split()
        x = self.block2(x)
        pipe_split()
        return self.block3(x)


class Mlp(torch.nn.Module):
    """Linear-heavy: ``depth`` blocks of Linear and GELU, ``width`` wide."""

    def __init__(self, width: int = 512, depth: int = 4) -> None:
        super().__init__()
        self.blocks = torch.nn.Sequential(*(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU())
            for _ in range(depth)
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class WideMiddle(torch.nn.Module):
    """16 features widened to 4096 and narrowed back: 4 KiB in and out at batch 64, 1 MiB
    between (the activation a split sends)."""

    def __init__(self) -> None:
        super().__init__()
        self.widen = torch.nn.Linear(16, 4096)
        self.narrow = torch.nn.Linear(4096, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.narrow(torch.relu(self.widen(x)))


class Inception(torch.nn.Module):
    """Three parallel convolution branches of different lengths, concatenated; the forward
    runs the wide one-layer branch first, so the program's order keeps its output live
    while the long branch runs."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        conv = torch.nn.Conv2d
        self.wide = torch.nn.Sequential(conv(channels, 4 * channels, 1))
        self.short = torch.nn.Sequential(conv(channels, channels // 2, 1))
        self.long = torch.nn.Sequential(
            conv(channels, channels, 3, padding=1), torch.nn.ReLU(),
            conv(channels, channels, 3, padding=1), torch.nn.ReLU(),
            conv(channels, channels // 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.wide(x), self.short(x), self.long(x)], dim=1)


@dataclass(frozen=True)
class ExportedSample:
    """A sample model, its inputs, its eager outputs, and its export archive loaded back
    (made by the ``sample_exported`` fixture in ``tests/conftest.py``)."""

    name: str
    module: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    expected: tuple[torch.Tensor, ...]
    path: Path
    model: LoadedModel
