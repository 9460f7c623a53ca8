"""Command line: parses arguments, builds a Config, calls one function. No logic here."""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

# TensorFlow's C++ start-up chatter is not for users; set before TF is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TRAIN_FLAGS = {  # flag -> (type, help); each is also a key of the TOML config
    "backbone": (str, "backbone name (see 'tlapp backbones'); default resnet50"),
    "weights": (str, "imagenet (default), none (random init) or PATH to a weights file"),
    "cut": (str, "layer where the frozen stem ends (see 'tlapp backbones NAME')"),
    "trainable_blocks": (int, "leave the top N blocks trainable; 0 (default) trains only the head"),
    "image_size": (int, "square input size in pixels; default: the backbone's own"),
    "epochs": (int, "training epochs (default 10)"),
    "batch_size": (int, "batch size (default 32)"),
    "lr": (float, "learning rate (default 1e-3)"),
    "dropout": (float, "dropout before the softmax layer (default 0.2)"),
    "val_fraction": (float, "fraction of each class held out for validation (default 0.1)"),
    "test_fraction": (float, "fraction of each class held out for test (default 0.1)"),
    "cache_dir": (str, "feature cache folder (default $TLAPP_CACHE_DIR, else ~/.cache/tlapp)"),
    "out": (str, "run folder to write (default models/BACKBONE-TIME)"),
    "seed": (int, "random seed (default 0)"),
    "max_pixels": (int, "skip images larger than this many pixels (default 200000000)"),
    "class_weight": (str, "none (default) or auto: weight the loss by inverse class frequency"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlapp", description="Transfer learning for image folders with Keras 3.",
        epilog="Exit status: 0 success, 2 bad usage or input, 1 unexpected failure.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train", help="train a classifier on an image folder",
        description="Extract features with a frozen pretrained stem (cached), train the top "
                    "and a new softmax head, evaluate, and export. Every flag can also be set "
                    "in a TOML file given with --config; flags override the file.")
    train.add_argument("data", nargs="?", metavar="DATA",
                       help="folder with one subfolder per class, or train/ val/ test/, "
                            "or tfds:NAME")
    train.add_argument("--config", metavar="FILE.toml", help="TOML file of settings")
    for name, (kind, text) in TRAIN_FLAGS.items():
        train.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=text,
                           metavar=name.split("_")[-1].upper())

    evaluate = commands.add_parser("evaluate", help="evaluate a run on its test split or a folder")
    evaluate.add_argument("run", metavar="RUN", help="run folder")
    evaluate.add_argument("--data", help="evaluate on every image of this folder instead")

    predict = commands.add_parser("predict", help="classify images with a trained run")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                         help="image files, folders or globs")
    predict.add_argument("--model", action="append", required=True, metavar="RUN",
                         help="run folder (repeat to average several runs)")
    predict.add_argument("--top-k", type=int, default=3, help="labels to show per image")
    predict.add_argument("--json", action="store_true", help="one JSON object per line")

    export = commands.add_parser("export", help="export a run as a SavedModel")
    export.add_argument("run", metavar="RUN", help="run folder")
    export.add_argument("--out", help="destination folder (default RUN/saved_model)")

    listing = commands.add_parser("backbones", help="list backbones, or one backbone's cut points")
    listing.add_argument("name", nargs="?", metavar="NAME")
    listing.add_argument("--image-size", type=int, help="size for shapes and cache bytes")

    demo = commands.add_parser("demo", help="run the whole pipeline on a built-in dataset")
    demo.add_argument("--out", default="models/demo", help="folder for data and run "
                                                           "(default models/demo)")
    demo.add_argument("--cache-dir", help="feature cache folder")
    return parser


def cmd_train(args) -> int:
    from tlapp import config as config_lib, pipeline

    values = config_lib.load_toml(args.config) if args.config else {}
    if args.data is not None:
        values["data"] = args.data
    values |= {k: v for k, v in vars(args).items() if k in TRAIN_FLAGS and v is not None}
    pipeline.run(config_lib.from_dict(values, args.config or "command line"))
    return 0


def cmd_evaluate(args) -> int:
    from tlapp import pipeline

    result = pipeline.evaluate_run(pipeline.load_run(args.run), data=args.data)
    print(f"accuracy {result['accuracy']:.4f} on {result['count']} images")
    for name, row in result["per_class"].items():
        print(f"  {name:20s} precision {row['precision']:.3f}  recall {row['recall']:.3f}  "
              f"f1 {row['f1']:.3f}  support {row['support']}")
    return 0


def cmd_predict(args) -> int:
    from tlapp import pipeline

    runs = [pipeline.load_run(path) for path in args.model]
    results = pipeline.predict(runs, args.images, top_k=args.top_k)
    for result in results:
        if args.json:
            print(json.dumps(result))
        elif "error" in result:
            print(f"{result['path']}: error: {result['error']}")
        else:
            best = ", ".join(f"{p['label']} {p['probability']:.3f}" for p in result["predictions"])
            print(f"{result['path']}: {best}")
    if not any("predictions" in r for r in results):
        print("error: none of the inputs could be read as an image", file=sys.stderr)
        return 2
    return 0


def cmd_export(args) -> int:
    from tlapp import exporting, pipeline

    run = pipeline.load_run(args.run)
    out = exporting.export_saved_model(run.model, run.labels, args.out or run.path / "saved_model")
    print(f"exported SavedModel to {out}")
    return 0


def cmd_backbones(args) -> int:
    from tlapp import report

    print(report.backbone_table(args.name, args.image_size))
    return 0


def cmd_demo(args) -> int:
    from tlapp import demo

    demo.run_demo(args.out, cache_dir=args.cache_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tlapp.config import UserInputError

    try:
        return globals()[f"cmd_{args.command}"](args)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("error: unexpected failure (above); please report it with the command you ran",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
