"""`cpm-edge`: one command, subcommands dispatched lazily so `--help` and the agent stay light.

This module only parses arguments; each subcommand's work lives in a function of its own room, imported
when the subcommand runs (torch is imported only by subcommands that need the torch model).
"""
from __future__ import annotations

import argparse
import logging
import sys

from cli import (agent_commands, device_commands, engine_commands, export_commands, flash_commands,
                 kernel_commands, model_commands)

# Each command module registers (name, add_arguments, run, help); run imports what it needs.
SUBCOMMANDS = [*model_commands.COMMANDS, *export_commands.COMMANDS, *kernel_commands.COMMANDS,
               *engine_commands.COMMANDS, *flash_commands.COMMANDS, *device_commands.COMMANDS,
               *agent_commands.COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpm-edge", description="Run OpenBMB MiniCPM4 models on edge GPUs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add_arguments, run, help_text in SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input: one line on stderr, exit status 2, no traceback."""
    from agent.errors import AgentInputError
    errors: list[type[BaseException]] = [AgentInputError]
    if "export.checkpoint" in sys.modules:
        errors.append(sys.modules["export.checkpoint"].CheckpointError)
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="cpm-edge: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("cpm-edge: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:
        if isinstance(e, user_errors()):
            print(f"cpm-edge {args.command}: error: {e}", file=sys.stderr)
            return 2
        builder = sys.modules.get("trt_plugins.engine_builder")
        if builder is not None and isinstance(e, builder.EngineBuildError):  # TensorRT's own words, one line
            print(f"cpm-edge {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
