"""Command line: parses arguments, builds a Config, calls one function. No logic here."""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

# TensorFlow's C++ start-up chatter is not for users; set before TF is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")



def blocks(text: str) -> int | str:
    """--trainable-blocks: a number or 'all'."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None


TRAIN_FLAGS = {  # flag -> (type, help); each is also a key of the TOML config
    "backbone": (str, "backbone name (see 'tlapp backbones') or PATH.keras; default resnet50"),
    "weights": (str, "imagenet (default), none (random init) or PATH to a weights file; "
                     "for a .keras backbone, saved (its own weights; imagenet means the same)"),
    "cut": (str, "layer where the frozen stem ends (see 'tlapp backbones NAME'); "
                 "'input' freezes nothing"),
    "trainable_blocks": (blocks, "leave the top N blocks trainable; 0 trains only the head; "
                                 "'all' trains every layer on images (default 0; 'all' for lenet5, alexnet)"),
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
    "cache": (str, "on (default): stage 1 trains on cached activations; off: the frozen stem "
                   "runs on every image every step"),
    "aug_views": (int, "cache K views per image: view 0 plain, views 1..K-1 augmented with "
                       "--augment; training reads a different view each epoch (default 1)"),
    "cache_dtype": (str, "auto (default: float16 for spatial activations, float32 for pooled), "
                         "float16 or float32"),
    "cache_shard_mb": (int, "size bound of one cache shard in MiB (default 64)"),
    "optimizer": (str, "adam (default), sgd (momentum 0.9, Nesterov) or adamw"),
    "lr_schedule": (str, "constant (default), cosine or plateau (reduce on plateau)"),
    "label_smoothing": (float, "label smoothing in [0, 1) (default 0)"),
    "early_stopping": (int, "stop after N epochs without a lower val loss and keep the best "
                            "weights (default 0: off)"),
    "fine_tune_epochs": (int, "stage 2: fine-tune deeper on images for N epochs (default 0)"),
    "fine_tune_blocks": (int, "stage 2 unfreezes N more blocks (default 1)"),
    "fine_tune_cut": (str, "or: stage 2 unfreezes everything above this layer"),
    "fine_tune_lr": (float, "stage 2 learning rate (default lr / 10)"),
    "bn_trainable": (bool, "let BatchNormalization layers train (default: frozen, inference "
                           "mode)"),
    "mixed_precision": (bool, "mixed_float16 compute (GPU speed-up; works but slow on CPU)"),
    "jit": (bool, "compile training steps with XLA"),
    "augment": (str, "augmentation spec, e.g. flip,crop=0.875,rotate=15,color=20 (ops and "
                     "ranges: README 'Augmentation'); applied to live training and to cached views (--aug-views)"),
    "preprocess": (str, "for a .keras backbone: none (default), caffe, tf or torch"),
    "max_pixels": (int, "skip images larger than this many pixels (default 200000000)"),
    "class_weight": (str, "none (default) or auto: weight the loss by inverse class frequency"),
}


TTA_CHOICES = ("none", "flip", "10crop")  # tlapp.inference.TTA_MODES, without importing TF
TTA_HELP = ("test-time augmentation: none (default), flip (image and mirror) or 10crop "
            "(corners and centre, each mirrored); probabilities are averaged")


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
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            train.add_argument(flag, dest=name, action="store_true", default=None, help=text)
        else:
            train.add_argument(flag, dest=name, type=kind, help=text,
                               metavar={"augment": "SPEC"}.get(name, name.split("_")[-1].upper()))
    train.add_argument("--resume", metavar="RUN", help="continue the interrupted run whose "
                       "--out was RUN from its last checkpoint (other flags are ignored)")

    evaluate = commands.add_parser(
        "evaluate", help="evaluate a run (or an ensemble) on its test split or a folder",
        description="Writes metrics.json (under 'evaluate'), confusion_matrix.csv, "
                    "misclassified.csv and plots/confusion_matrix.png.")
    evaluate.add_argument("run", nargs="?", metavar="RUN", help="run folder")
    evaluate.add_argument("--model", action="append", metavar="RUN",
                          help="run folder; repeat to evaluate an ensemble (averaged)")
    evaluate.add_argument("--data", help="evaluate on every image of this folder instead")
    evaluate.add_argument("--tta", choices=TTA_CHOICES, default="none", help=TTA_HELP)
    evaluate.add_argument("--out", help="folder for the results (default: the run folder; "
                                        "for an ensemble models/ensemble-TIME)")
    evaluate.add_argument("--batch-size", type=int, default=32, help="images per batch")

    predict = commands.add_parser("predict", help="classify images with a trained run")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                         help="image files, folders or globs")
    predict.add_argument("--model", action="append", required=True, metavar="RUN",
                         help="run folder (repeat to average several runs)")
    predict.add_argument("--top-k", type=int, default=3, help="labels to show per image")
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.add_argument("--tta", choices=TTA_CHOICES, default="none", help=TTA_HELP)
    predict.add_argument("--batch-size", type=int, default=32, help="images per batch")

    export = commands.add_parser("export", help="export a run or an ensemble (SavedModel, TFLite)")
    export.add_argument("run", nargs="?", metavar="RUN", help="run folder")
    export.add_argument("--ensemble", nargs="+", metavar="RUN",
                        help="runs whose probabilities the SavedModel averages (needs --out)")
    export.add_argument("--format", choices=("saved_model", "tflite"), default="saved_model",
                        help="saved_model (default) or tflite (raw-pixel input)")
    export.add_argument("--quantize", choices=("none", "dynamic", "float16"), default="none",
                        help="TFLite weights: none (float32), dynamic (int8) or float16")
    export.add_argument("--tta", choices=TTA_CHOICES, default="none",
                        help="bake test-time augmentation into the SavedModel: flip or 10crop")
    export.add_argument("--out", help="destination folder (default RUN/saved_model, "
                                      "RUN/saved_model_TTA or RUN/tflite)")

    experiment = commands.add_parser(
        "experiment", help="run a sweep of training runs from a TOML file",
        description="Base settings plus a [sweep] table of lists (every combination) and/or "
                    "[[runs]] entries. Runs share one feature cache; finished runs are "
                    "skipped on a rerun; a failed run is recorded and the others continue. "
                    "Writes OUT/<run>/, OUT/results.csv, OUT/results.md, OUT/plots/results.png.")
    experiment.add_argument("config", metavar="CONFIG.toml", help="experiment file")
    experiment.add_argument("--out", help="experiment folder (default: 'out' in the file, "
                                          "else models/experiments/<file name>)")

    listing = commands.add_parser(
        "backbones", help="list backbones with parameters and MACs, or one's cut points")
    listing.add_argument("name", nargs="?", metavar="NAME", help="backbone name or PATH.keras")
    listing.add_argument("--image-size", type=int, help="size for shapes and cache bytes")

    preview = commands.add_parser(
        "augment-preview", help="write a grid of augmented variants of a few images",
        description="Scan DATA, take N training images (alternating classes) and write a PNG "
                    "grid: one row per image, the original then M augmented variants.")
    preview.add_argument("data", metavar="DATA", help="image folder (one subfolder per class)")
    preview.add_argument("--augment", required=True, metavar="SPEC",
                         help="augmentation spec, e.g. flip,rotate=15,color=20")
    preview.add_argument("--out", default="augment_preview.png", metavar="PNG",
                         help="PNG to write (default augment_preview.png)")
    preview.add_argument("--images", type=int, default=4, metavar="N", help="rows (default 4)")
    preview.add_argument("--variants", type=int, default=6, metavar="M",
                         help="augmented variants per image (default 6)")
    preview.add_argument("--image-size", type=int, default=128, metavar="N",
                         help="square size of each cell in pixels (default 128)")
    preview.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    cache = commands.add_parser(
        "cache", help="list, verify or clear the feature cache",
        description="list: entries with backbone, weights, cut, size, rows, bytes, last use. "
                    "verify: full checksums of every shard (exit 2 if any is damaged; the next "
                    "run re-extracts damaged rows). clear: delete entries.")
    cache.add_argument("action", choices=["list", "verify", "clear"])
    cache.add_argument("entries", nargs="*", metavar="ENTRY", help="entry names (default: all "
                       "for list/verify; clear needs ENTRY, --older-than or --all)")
    cache.add_argument("--cache-dir", help="cache folder (default $TLAPP_CACHE_DIR, else "
                                           "~/.cache/tlapp)")
    cache.add_argument("--older-than", type=float, metavar="DAYS", help="clear: entries unused "
                                                                        "for more than DAYS")
    cache.add_argument("--all", action="store_true", help="clear: every entry")

    demo = commands.add_parser("demo", help="run the whole pipeline on a built-in dataset")
    demo.add_argument("--out", default="models/demo", help="folder for data and run "
                                                           "(default models/demo)")
    demo.add_argument("--cache-dir", help="feature cache folder")
    return parser


def cmd_train(args) -> int:
    from tlapp import config as config_lib, pipeline

    if args.resume:
        pipeline.run(pipeline.resume_config(args.resume), resume=True)
        return 0
    values = config_lib.load_toml(args.config) if args.config else {}
    if args.data is not None:
        values["data"] = args.data
    values |= {k: v for k, v in vars(args).items() if k in TRAIN_FLAGS and v is not None}
    pipeline.run(config_lib.from_dict(values, args.config or "command line"))
    return 0


def cmd_evaluate(args) -> int:
    from tlapp import runs

    paths = ([args.run] if args.run else []) + (args.model or [])
    result = runs.evaluate_run(paths, data=args.data, tta=args.tta, out=args.out,
                                   batch_size=args.batch_size)
    top5 = f", top-5 accuracy {result['top5_accuracy']:.4f}" if "top5_accuracy" in result else ""
    print(f"accuracy {result['accuracy']:.4f}{top5} on {result['count']} images "
          f"(tta {args.tta}, {len(paths)} model{'s' if len(paths) > 1 else ''}); "
          f"macro F1 {result['macro_f1']:.4f}, weighted F1 {result['weighted_f1']:.4f}")
    for name, row in result["per_class"].items():
        print(f"  {name:20s} precision {row['precision']:.3f}  recall {row['recall']:.3f}  "
              f"f1 {row['f1']:.3f}  support {row['support']}")
    print(f"wrote metrics.json, confusion_matrix.csv, misclassified.csv and "
          f"plots/confusion_matrix.png in {result['out']}")
    return 0


def cmd_predict(args) -> int:
    from tlapp import runs as runs_lib

    runs = [runs_lib.load_run(path) for path in args.model]
    readable = False
    for result in runs_lib.iter_predictions(runs, args.images, top_k=args.top_k,
                                            batch_size=args.batch_size, tta=args.tta):
        readable = readable or "predictions" in result
        if args.json:
            print(json.dumps(result))
        elif "error" in result:
            print(f"{result['path']}: error: {result['error']}")
        else:
            best = ", ".join(f"{p['label']} {p['probability']:.3f}" for p in result["predictions"])
            print(f"{result['path']}: {best}")
    if not readable:
        print("error: none of the inputs could be read as an image", file=sys.stderr)
        return 2
    return 0


def cmd_export(args) -> int:
    from tlapp import exporting, runs as runs_lib
    from tlapp.config import UserInputError

    paths = ([args.run] if args.run else []) + (args.ensemble or [])
    if not paths:
        raise UserInputError("Nothing to export: give RUN, or --ensemble RUN1 RUN2 ... --out DIR.")
    runs = [runs_lib.load_run(path) for path in paths]
    out = exporting.export_runs(runs, args.out, format=args.format, tta=args.tta,
                                quantize=args.quantize)
    print(f"exported {'TFLite model' if args.format == 'tflite' else 'SavedModel'} to {out}")
    return 0


def cmd_experiment(args) -> int:
    from tlapp import experiments

    return experiments.run_experiment(args.config, out=args.out).exit_status


def cmd_backbones(args) -> int:
    from tlapp import report

    print(report.backbone_table(args.name, args.image_size))
    return 0


def cmd_augment_preview(args) -> int:
    from tlapp import augment

    augment.preview(args.data, args.augment, args.out, images=args.images,
                    variants=args.variants, image_size=args.image_size, seed=args.seed)
    return 0


def cmd_cache(args) -> int:
    import time
    from pathlib import Path

    from tlapp import cache, config as config_lib

    folder = Path(args.cache_dir).expanduser() if args.cache_dir else \
        config_lib.default_cache_dir()
    entries = cache.list_entries(folder)
    known = {e["entry"] for e in entries}
    unknown = [name for name in args.entries if name not in known]
    if unknown:
        raise config_lib.UserInputError(f"No cache entry named {', '.join(unknown)} in {folder}; "
                                        f"'tlapp cache list' shows the entries.")
    chosen = [e for e in entries if not args.entries or e["entry"] in args.entries]
    if args.action == "list":
        print(f"{folder}: {len(entries)} entries, "
              f"{sum(e['bytes'] for e in entries) / 2**20:,.1f} MiB")
        for e in chosen:
            key = e["key"]
            print(f"  {e['entry']}\n    backbone {key['backbone']}, weights "
                  f"{key['weights'][:12]}, cut {key['cut']}, {key['image_size']} px, "
                  f"{key.get('views', 1)} view(s), {key.get('dtype', 'float32')}; {e['rows']:,} "
                  f"rows, {e['bytes'] / 2**20:,.1f} MiB, last used "
                  f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(e['last_used']))}")
        return 0
    if args.action == "verify":
        damaged = 0
        for e in chosen:
            problems = cache.verify_entry(folder / e["entry"])
            damaged += len(problems)
            print(f"{e['entry']}: " + ("ok" if not problems else
                                       "; ".join(f"{f}: {p}" for f, p in problems)))
        if damaged:
            print(f"error: {damaged} damaged shard(s); the next run that uses the entry "
                  f"extracts their rows again", file=sys.stderr)
            return 2
        return 0
    if not (args.entries or args.older_than is not None or args.all):
        raise config_lib.UserInputError("Say what to clear: ENTRY names, --older-than DAYS, "
                                        "or --all.")
    removed = cache.clear_entries(folder, args.entries or None, args.older_than)
    print(f"removed {len(removed)} entries from {folder}")
    return 0


def cmd_demo(args) -> int:
    from tlapp import demo

    demo.run_demo(args.out, cache_dir=args.cache_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tlapp.config import UserInputError

    try:
        return globals()[f"cmd_{args.command.replace('-', '_')}"](args)
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
