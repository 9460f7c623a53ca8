"""`tlapp train`: its flags are generated from `tlapp.config.Config`, whose fields carry each
setting's type, default, choices and help text, written once, there."""
from __future__ import annotations

import argparse
import dataclasses

from tlapp import config as config_lib


def blocks(text: str) -> int | str:
    """--trainable-blocks: a number or 'all'."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None


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
        kind = blocks if types == (int, str) else types[0]
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
    train.set_defaults(func=cmd_train, prepare=prepare_train)


def train_config(args) -> config_lib.Config:
    """The run's config: from --resume, or from --config and the flags given."""
    if args.resume:
        from tlapp import pipeline

        return pipeline.resume_config(args.resume)
    values = config_lib.load_toml(args.config) if args.config else {}
    if args.data is not None:
        values["data"] = args.data
    values |= {k: v for k, v in vars(args).items() if k in config_lib.FIELDS and v is not None
               and k != "data"}
    return config_lib.from_dict(values, args.config or "command line")


def prepare_train(args) -> None:
    """Runs before TensorFlow initialises its devices: what the run's strategy needs first
    (a multi-worker strategy, the TLAPP_LOGICAL_CPUS split)."""
    from tlapp.training import distribute

    args.train_config = train_config(args)
    distribute.prepare_process(args.train_config.strategy)


def cmd_train(args) -> int:
    from tlapp import pipeline

    config = getattr(args, "train_config", None) or train_config(args)
    pipeline.run(config, resume=bool(args.resume))
    return 0
