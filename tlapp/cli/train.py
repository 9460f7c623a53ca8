"""`tlapp train`: its flags are generated from `tlapp.config.Config`, whose fields carry each
setting's type, default, choices and help text, written once, there."""
from __future__ import annotations

import argparse
import dataclasses

from tlapp import config as config_lib


def number_or(word: str, kind: type):
    """An argparse type for flags that take a number or one word: --trainable-blocks
    (a whole number or 'all'), --reject-below (a probability or 'auto')."""
    def parse(text: str):
        if text == word:
            return text
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or {word!r}, got "
                                             f"{text!r}") from None
    return parse


blocks = number_or("all", int)
number_or_auto = number_or("auto", float)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field: --name-with-dashes, typed, with its help and default.

    Defaults stay None here, so that only the flags given override a --config file."""
    for field in dataclasses.fields(config_lib.Config):
        meta = field.metadata
        if not meta["flag"]:
            continue
        flag = "--" + field.name.replace("_", "-")
        types = config_lib.field_types(field.name)
        default = "" if field.default is None else f" (default {field.default})"
        text = meta["help"] + default
        if types == (bool,):
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=None, help=text)
            continue
        kind = blocks if types == (int, str) else number_or_auto if types == (float, str) \
            else types[0]
        # Choices are checked by Config, whose message names the key and the value received.
        metavar = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else \
            meta["metavar"] or "VALUE"
        parser.add_argument(flag, dest=field.name, type=kind, default=None, help=text,
                            metavar=metavar)


def add_parsers(commands) -> None:
    train = commands.add_parser(
        "train", help="train a classifier on an image folder",
        description="Extract features with a frozen pretrained stem (cached), train the top "
                    "and a new softmax head, evaluate, and export. Every flag can also be set "
                    "in a TOML file given with --config; flags override the file.")
    train.add_argument("data", nargs="?", metavar="DATA",
                       help=config_lib.FIELDS["data"].metadata["help"])
    train.add_argument("--config", metavar="FILE.toml", help="TOML file of settings")
    add_config_flags(train)
    train.add_argument("--resume", metavar="RUN", help="continue the interrupted run whose "
                       "--out was RUN from its last checkpoint (other flags are ignored)")
    train.set_defaults(func=cmd_train)



def cmd_train(args) -> int:
    from tlapp import pipeline

    if args.resume:
        pipeline.run(pipeline.resume_config(args.resume), resume=True)
        return 0
    values = config_lib.load_toml(args.config) if args.config else {}
    if args.data is not None:
        values["data"] = args.data
    values |= {k: v for k, v in vars(args).items() if k in config_lib.FIELDS and v is not None
               and k != "data"}
    pipeline.run(config_lib.from_dict(values, args.config or "command line"))
    return 0
