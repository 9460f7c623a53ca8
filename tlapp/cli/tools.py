"""Commands around training: experiments, the backbone tables, the augmentation preview,
the feature cache, the demo."""
from __future__ import annotations

import logging
from pathlib import Path

from tlapp import config as config_lib
from tlapp.cli.startup import start_tensorflow
from tlapp.errors import UserInputError

log = logging.getLogger("tlapp")


def add_parsers(commands) -> None:
    experiment = commands.add_parser(
        "experiment", help="run a sweep or a hyperparameter search from a TOML file",
        description="Base settings plus a [sweep] table of lists (every combination) and/or "
                    "[[runs]] entries. Runs share one feature cache; finished runs are "
                    "skipped on a rerun; a failed run is recorded and the others continue. "
                    "Writes OUT/<run>/, OUT/results.csv, OUT/results.md, OUT/plots/results.png. "
                    "Or base settings plus a [search] table (method, trials, ranges; README "
                    "'Hyperparameter search'): trials on the shared cache, compared on "
                    "validation accuracy, resumed on a rerun; the best configuration is "
                    "trained once more and evaluated on the test split (OUT/best-trial-N/, "
                    "OUT/best.toml).")
    experiment.add_argument("config", metavar="CONFIG.toml", help="experiment file")
    experiment.add_argument("--out", help="experiment folder (default: 'out' in the file, "
                                          "else models/experiments/<file name>)")
    experiment.set_defaults(func=cmd_experiment)

    listing = commands.add_parser(
        "backbones", help="list backbones with parameters and MACs, or one's cut points")
    listing.add_argument("name", nargs="?", metavar="NAME", help="backbone name or PATH.keras")
    listing.add_argument("--image-size", type=int, help="size for shapes and cache bytes")
    listing.add_argument("--cache-dir", help="where the tables are kept (default: the "
                                             "feature cache folder)")
    listing.set_defaults(func=cmd_backbones)

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
    preview.set_defaults(func=cmd_augment_preview)

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
    cache.set_defaults(func=cmd_cache)

    demo = commands.add_parser("demo", help="run the whole pipeline on a built-in dataset")
    demo.add_argument("--out", default="models/demo", help="folder for data and run "
                                                           "(default models/demo)")
    demo.add_argument("--cache-dir", help="feature cache folder")
    demo.set_defaults(func=cmd_demo)


def cmd_experiment(args) -> int:
    if "search" in config_lib.read_toml(args.config):
        from tlapp.search import results, runner

        found = runner.run_search(args.config, out=args.out)
        print(results.results_table(found.rows, [p.name for p in found.spec.params]))
        if found.best is not None:
            test = found.test_accuracy
            print(f"\nbest: trial {found.best['trial']}, val accuracy "
                  f"{100 * found.best['val_accuracy']:.1f}%; test accuracy of the best "
                  f"configuration (evaluated once, {found.best_run}): "
                  + ("n/a" if test is None else f"{100 * test:.1f}%"))
        return found.exit_status
    from tlapp import experiments

    result = experiments.run_experiment(args.config, out=args.out)
    print(experiments.results_table(result))
    return result.exit_status


def cmd_backbones(args) -> int:
    from tlapp.reporting import tables

    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else \
        config_lib.default_cache_dir()
    table = tables.kept_table(args.name, args.image_size, cache_dir)
    if table is None:  # built once per Keras version; TensorFlow only then
        start_tensorflow(args.verbose)
        table = tables.backbone_table(args.name, args.image_size, cache_dir)
    print(table)
    return 0


def cmd_augment_preview(args) -> int:
    from tlapp.reporting.preview import preview

    preview(args.data, args.augment, args.out, images=args.images, variants=args.variants,
            image_size=args.image_size, seed=args.seed)
    return 0


def cmd_cache(args) -> int:
    import time

    from tlapp.features import cache

    folder = Path(args.cache_dir).expanduser() if args.cache_dir else \
        config_lib.default_cache_dir()
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"{folder} is a file; --cache-dir takes the cache folder.")
    if args.older_than is not None and not args.older_than >= 0:
        raise UserInputError(f"--older-than takes a number of days, 0 or more. Received: "
                             f"older_than={args.older_than}")
    entries = cache.list_entries(folder)
    known = {e["entry"] for e in entries}
    unknown = [name for name in args.entries if name not in known]
    if unknown:
        raise UserInputError(f"No cache entry named {', '.join(unknown)} in {folder}; "
                             f"'tlapp cache list' shows the entries.")
    chosen = [e for e in entries if not args.entries or e["entry"] in args.entries]
    if args.action == "list":
        print(f"{folder}: {len(entries)} entries, "
              f"{sum(e['bytes'] for e in entries) / 2**20:,.1f} MiB")
        for e in chosen:
            key = e["key"]
            described = (f"backbone {key['backbone']}, weights {str(key['weights'])[:12]}, "
                         f"cut {key['cut']}, {key['image_size']} px, {key.get('views', 1)} "
                         f"view(s), {key.get('dtype', 'float32')}; ") if all(
                k in key for k in ("backbone", "weights", "cut", "image_size")) else ""
            print(f"  {e['entry']}\n    {described}{e['rows']:,} rows, "
                  f"{e['bytes'] / 2**20:,.1f} MiB, last used "
                  f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(e['last_used']))}")
            for file, problem in e["problems"]:
                print(f"    damaged: {file}: {problem} (the next run that uses the entry "
                      f"repairs it; 'tlapp cache clear {e['entry']}' removes it)")
        return 0
    if args.action == "verify":
        damaged = 0
        for e in chosen:
            problems = cache.verify_entry(folder / e["entry"])
            damaged += len(problems)
            print(f"{e['entry']}: " + ("ok" if not problems else
                                       "; ".join(f"{f}: {p}" for f, p in problems)))
        if damaged:
            log.error("error: %d damaged shard(s); the next run that uses the entry extracts "
                      "their rows again", damaged)
            return 2
        return 0
    if not (args.entries or args.older_than is not None or args.all):
        raise UserInputError("Say what to clear: ENTRY names, --older-than DAYS, or --all.")
    removed = cache.clear_entries(folder, args.entries or None, args.older_than)
    print(f"removed {len(removed)} entries from {folder}")
    return 0


def cmd_demo(args) -> int:
    from tlapp import demo

    demo.run_demo(args.out, cache_dir=args.cache_dir)
    return 0
