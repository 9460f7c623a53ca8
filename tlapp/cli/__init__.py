"""Command line: parses arguments, builds a Config, calls one function. No logic here.

One module per group of commands (train.py; runs.py: evaluate, predict, export; tools.py:
experiment, backbones, augment-preview, cache, demo), each adding its parsers; this module
sets up logging, starts TensorFlow (startup.py) and runs the chosen command.
"""
from __future__ import annotations

import argparse
import functools
import gc
import logging
import sys
import traceback

from tlapp import __version__
from tlapp.cli import runs, tools, train
from tlapp.cli.startup import start_tensorflow
from tlapp.errors import UserInputError
from tlapp.files import is_disk_full

log = logging.getLogger("tlapp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlapp", description="Transfer learning for image folders with Keras 3.",
        epilog="Exit status: 0 success, 2 bad usage or input, 1 unexpected failure.")
    parser.add_argument("--version", action="version", version=f"tlapp {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true",
                           help="only warnings and errors; no progress bars")
    verbosity.add_argument("-v", "--verbose", action="store_true",
                           help="debug messages, and TensorFlow's own start-up lines")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in (train, runs, tools):
        group.add_parsers(commands)
    return parser


class _Formatter(logging.Formatter):
    """Messages as they are; warnings from other libraries prefixed with their source."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.name.startswith("tlapp") else f"{record.name}: {message}"


def run() -> int:
    """The `tlapp` command and `python -m tlapp`: `main` in a process of its own.

    Everything alive when TensorFlow has started, and when the command ends, lives as long
    as the process: `gc.freeze()` takes it out of the garbage collector's passes (each full
    pass visits every object of TensorFlow and Keras: 0.1-0.2 s, several per run, and one
    at exit, measured at 0.7-1.5 s of every command). Not for `main` called in a process
    that goes on (tests, notebooks): what it would freeze is theirs.
    """
    code = main(own_process=True)
    gc.freeze()
    return code


def main(argv: list[str] | None = None, own_process: bool = False) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)  # the current stderr (tests replace it)
    handler.setFormatter(_Formatter("%(message)s"))
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    previous = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False  # libraries (absl) may give the root logger a handler of its own
    try:
        if args.command != "backbones":  # which starts TensorFlow only when it must
            prepare = getattr(args, "prepare", None)  # what must precede device start-up
            start_tensorflow(args.verbose, prepare and functools.partial(prepare, args))
        if own_process:
            gc.freeze()
        return args.func(args)
    except UserInputError as e:
        log.error("error: %s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except OSError as e:
        if not is_disk_full(e):
            log.error("%s\nerror: unexpected failure (above); please report it with the "
                      "command you ran", traceback.format_exc().rstrip())
            return 1
        log.error("error: the disk is full (%s). Free some space and run the command again.",
                  e)
        return 2
    except Exception:
        log.error("%s\nerror: unexpected failure (above); please report it with the command "
                  "you ran", traceback.format_exc().rstrip())
        return 1
    finally:
        log.removeHandler(handler)
        log.setLevel(previous[0])
        log.propagate = previous[1]


if __name__ == "__main__":
    sys.exit(run())
