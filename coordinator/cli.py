"""The ``coordinator`` command line: one subcommand per module, errors as one clear line."""

from __future__ import annotations

import argparse
import logging
import sys

from partition.allocator import keep_large_buffers
from partition.errors import EdgesplitError

EXTRA_OF_MODULE = {
    "yaml": "coordinator", "rich": "coordinator", "matplotlib": "coordinator",
    "platformdirs": "coordinator", "psutil": "coordinator", "transformers": "models",
}
"""The install extra that brings each optional module the coordinator imports."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (importing them needs the ``coordinator`` extra)."""
    from coordinator import (
        bench_command,
        certs_command,
        cluster_command,
        demo_command,
        deploy_command,
        plan_command,
        probe_command,
        profile_command,
    )

    parser = argparse.ArgumentParser(
        prog="coordinator",
        description="Plan, deploy and run a PyTorch model split across edge devices.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (
        profile_command, plan_command, deploy_command, bench_command, cluster_command,
        demo_command, certs_command, probe_command,
    ):
        command.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except ModuleNotFoundError as err:
        return _missing_extra(err)
    from coordinator.console import errors

    keep_large_buffers()
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.run(args)
    except (EdgesplitError, OSError) as err:
        if args.debug:
            raise
        errors.print(f"coordinator: error: {_one_line(err)}", markup=False, soft_wrap=True)
        return 2
    except ModuleNotFoundError as err:  # e.g. the sample models without transformers
        return _missing_extra(err)
    except KeyboardInterrupt:
        errors.print("coordinator: interrupted")
        return 130


def _missing_extra(err: ModuleNotFoundError) -> int:
    """One line naming the extra to install, for a module only an extra brings."""
    extra = EXTRA_OF_MODULE.get((err.name or "").partition(".")[0])
    if extra is None:
        raise err
    print(
        f"coordinator: error: {err.name} is not installed; this command needs "
        f"pip install 'edgesplit[{extra}]' (a worker device needs only edge-node)",
        file=sys.stderr,
    )
    return 2


def _one_line(err: Exception) -> str:
    """The message of a project error, or of a file the system refused to read or write."""
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror}; check the path and its permissions"
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
