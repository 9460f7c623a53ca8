"""`tlapp train`: its flags are generated from `tlapp.config.Config`, whose fields carry each
setting's type, default, choices and help text, written once, there."""
from __future__ import annotations

import argparse
import dataclasses

from tlapp import config as config_lib


def number_or(word: str, kind: type):
    """An argparse type for flags that take a number or one word: --trainable-blocks
    (a whole number or 'all'), --lr and --reject-below (a number or 'auto')."""
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


def add_config_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per Config field: --name-with-dashes, typed, with its help and default.

    Defaults stay None here, so that only the flags given override a --config file.
    `exclude` names fields a command has no use for."""
    for field in dataclasses.fields(config_lib.Config):
        meta = field.metadata
        if not meta["flag"] or field.name in exclude:
            continue
        flag = "--" + field.name.replace("_", "-")
        types = config_lib.field_types(field.name)
        default = "" if field.default is None else f" (default {field.default})"
        text = meta["help"] + default
        if types == (bool,):
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=None, help=text)
            continue
        kind = {(int, str): blocks, (float, str): number_or_auto}.get(types, types[0])
        # Choices are checked by Config, whose message names the key and the value received.
        metavar = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else \
            meta["metavar"] or "VALUE"
        parser.add_argument(flag, dest=field.name, type=kind, default=None, help=text,
                            metavar=metavar)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """DATA and --config, as every command that builds a Config takes them."""
    parser.add_argument("data", nargs="?", metavar="DATA",
                        help=config_lib.FIELDS["data"].metadata["help"])
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file of settings")


def add_parsers(commands) -> None:
    train = commands.add_parser(
        "train", help="train a classifier on an image folder",
        description="Extract features with a frozen pretrained stem (cached), train the top "
                    "and a new softmax head, evaluate, and export. Every flag can also be set "
                    "in a TOML file given with --config; flags override the file.")
    add_data_arguments(train)
    add_config_flags(train)
    train.add_argument("--resume", metavar="RUN", help="continue the interrupted run whose "
                       "--out was RUN from its last checkpoint (other flags are ignored)")
    train.set_defaults(func=cmd_train, prepare=prepare_train)

    finder = commands.add_parser(
        "lr-find", help="learning-rate range test: suggest a rate and plot loss against rate",
        description="Train for a few hundred steps while the learning rate grows "
                    "exponentially (stopping when the loss diverges), print the suggested "
                    "rate (a tenth of the rate at the lowest smoothed loss) and write a plot. "
                    "Stage 1 runs on cached features (extracting only what the cache lacks); "
                    "--stage fine-tune trains stage 1 first, then tests the fine-tuning stage "
                    "on images. Takes every flag of 'tlapp train'.")
    add_data_arguments(finder)
    finder.add_argument("--stage", default="head", choices=["head", "fine-tune"],
                        help="head: stage 1 (default); fine-tune: the fine-tuning stage")
    finder.add_argument("--steps", type=int, default=200, metavar="N",
                        help="steps of the test at most (default 200)")
    finder.add_argument("--min-lr", type=float, default=1e-7, metavar="X",
                        help="first rate (default 1e-7)")
    finder.add_argument("--max-lr", type=float, default=10.0, metavar="X",
                        help="last rate (default 10)")
    finder.add_argument("--plot", default="lr_find.png", metavar="PNG",
                        help="plot to write (default lr_find.png)")
    add_config_flags(finder, exclude=("out", "track"))
    finder.set_defaults(func=cmd_lr_find)

    extract = commands.add_parser(
        "extract", help="fill the feature cache (or one shard of it) without training",
        description="Runs the frozen stem that the train flags define on every image of "
                    "DATA, or with --shard I/N on part I of N (by content hash), and stores "
                    "the activations in the cache. Shards can run at once, on one machine or "
                    "several sharing the cache folder; 'tlapp train' with the same flags then "
                    "extracts only what is missing. Without --shard, a process with a "
                    "TF_CONFIG of several tasks takes its part from it.")
    add_data_arguments(extract)
    extract.add_argument("--shard", metavar="I/N",
                         help="extract part I of N (0 <= I < N), e.g. $SLURM_ARRAY_TASK_ID/8")
    add_config_flags(extract, exclude=("out", "track", "strategy"))
    extract.set_defaults(func=cmd_extract)


def config_from_args(args) -> config_lib.Config:
    """A --config file, DATA and the flags given (which override the file)."""
    values = config_lib.load_toml(args.config) if args.config else {}
    if args.data is not None:
        values["data"] = args.data
    values |= {k: v for k, v in vars(args).items() if k in config_lib.FIELDS and v is not None
               and k != "data"}
    return config_lib.from_dict(values, args.config or "command line")


def train_config(args) -> config_lib.Config:
    """The run's config: from --resume, or from --config and the flags given."""
    if args.resume:
        from tlapp import pipeline

        return pipeline.resume_config(args.resume)
    return config_from_args(args)


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


def cmd_extract(args) -> int:
    from tlapp.pipeline import extraction

    shard = extraction.parse_shard(args.shard)  # a bad --shard: said before any work
    stats = extraction.extract(config_from_args(args), shard)
    print(f"{'shard ' + stats['shard'] + ': ' if stats['shard'] else ''}{stats['images']:,} "
          f"images: extracted {stats['extracted']:,} rows, reused {stats['reused']:,} "
          f"(cache entry {stats['entry']})")
    return 0


def cmd_lr_find(args) -> int:
    from tlapp.pipeline import rates

    test = rates.find_lr(config_from_args(args), args.stage, args.plot, args.steps,
                         args.min_lr, args.max_lr)
    print(f"suggested learning rate: {test.suggestion:.3g}")
    print(f"(lowest smoothed loss at {test.minimum:.3g}; {len(test.rates)} steps from "
          f"{test.rates[0]:.3g} to {test.rates[-1]:.3g}"
          f"{', stopped when the loss diverged' if test.diverged else ''}; plot: {args.plot})")
    return 0
