"""``--markdown``: the block README quotes from a benchmark run, in one format for every script.

The block is one line naming the command and the machine it ran on, then each table as a
fenced block. With ``--markdown`` a script's usual output goes to stderr, so stdout holds
only the block.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from node.sysinfo import cpu_count, cpu_model, memory_bytes
from partition.units import format_bytes

ROOT = Path(__file__).resolve().parents[1]


def add_markdown_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--markdown`` to a benchmark's options."""
    parser.add_argument(
        "--markdown", action="store_true",
        help="print only README's block (machine, command, tables); usual output to stderr",
    )


@contextlib.contextmanager
def usual_output(markdown: bool) -> Iterator[None]:
    """Send the script's usual output to stderr while ``markdown`` is set, else leave it.

    The redirect is of file descriptor 1, so child processes started inside it (workers,
    servers, ranks) print to stderr too, and stdout keeps only the Markdown block.
    """
    if not markdown:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def machine() -> str:
    """This machine's CPU model, cores and RAM, and the torch and Python versions."""
    return (f"{cpu_model()} ({cpu_count()} cores, {format_bytes(memory_bytes()[0])} RAM), "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def command() -> str:
    """The command line that ran this process, with paths relative to the repository root."""
    words = [_from_root(sys.executable), _from_root(sys.argv[0]), *sys.argv[1:]]
    return shlex.join(words)


def markdown(*tables: Sequence[str]) -> str:
    """The command and machine line, then each table's lines as a fenced block."""
    blocks = [f"`{command()}` on {machine()}:"]
    blocks += ["\n".join(["```", *table, "```"]) for table in tables]
    return "\n\n".join(blocks)


def _from_root(path: str) -> str:
    """``path`` relative to the repository root when it lies inside it, else as given."""
    absolute = Path(os.path.abspath(path))
    return str(absolute.relative_to(ROOT)) if absolute.is_relative_to(ROOT) else path
