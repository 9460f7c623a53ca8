"""Commands on finished runs: evaluate, predict, export."""
from __future__ import annotations

import json

from tlapp.cli.train import number_or_auto
from tlapp.constants import TTA_MODES
from tlapp.errors import UserInputError

REJECT_HELP = ("answer 'unknown' when the top probability is below P (default: the run's "
               "own threshold if it was trained with --reject-below; auto: insist on it)")
TTA_HELP = ("test-time augmentation: none (default), flip (image and mirror) or 10crop "
            "(corners and centre, each mirrored); probabilities are averaged")


def add_parsers(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="evaluate a run (or an ensemble) on its test split or a folder",
        description="Writes metrics.json (under 'evaluate'), confusion_matrix.csv, "
                    "misclassified.csv and plots/confusion_matrix.png.")
    evaluate.add_argument("run", nargs="?", metavar="RUN", help="run folder")
    evaluate.add_argument("--model", action="append", metavar="RUN",
                          help="run folder; repeat to evaluate an ensemble (averaged)")
    evaluate.add_argument("--data", help="evaluate on every image of this folder (class "
                                         "folders) or CSV / JSON Lines list instead")
    evaluate.add_argument("--tta", choices=TTA_MODES, default="none", help=TTA_HELP)
    evaluate.add_argument("--out", help="folder for the results (default: the run folder; "
                                        "for an ensemble models/ensemble-TIME)")
    evaluate.add_argument("--batch-size", type=int, default=32, help="images per batch")
    evaluate.add_argument("--reject-below", type=number_or_auto, metavar="P|auto",
                          help=REJECT_HELP + "; reports accuracy on the answered images and "
                                             "the share answered")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = commands.add_parser("predict", help="classify images with a trained run")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                         help="image files, folders, globs, or CSV / JSON Lines lists "
                              "(their 'path' column)")
    predict.add_argument("--model", action="append", required=True, metavar="RUN",
                         help="run folder (repeat to average several runs)")
    predict.add_argument("--top-k", type=int, default=3,
                         help="labels to show per image (a multi-label run shows every label "
                              "at or above its threshold)")
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.add_argument("--tta", choices=TTA_MODES, default="none", help=TTA_HELP)
    predict.add_argument("--batch-size", type=int, default=32, help="images per batch")
    predict.add_argument("--reject-below", type=number_or_auto, metavar="P|auto",
                         help=REJECT_HELP)
    predict.set_defaults(func=cmd_predict)

    explain = commands.add_parser(
        "explain", help="show where the model looked: Grad-CAM heatmaps of images",
        description="Writes OUT/NAME.gradcam.png per image: the image, a Grad-CAM heatmap "
                    "over it (from the backbone's last convolutional activation), and the "
                    "top-3 classes with probabilities.")
    explain.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                         help="image files, folders, globs or CSV / JSON Lines lists")
    explain.add_argument("--model", required=True, metavar="RUN", help="run folder")
    explain.add_argument("--out", help="folder for the PNGs (default RUN/explain)")
    explain.add_argument("--class", dest="class_name", metavar="NAME",
                         help="explain this class (default: each image's top class)")
    explain.set_defaults(func=cmd_explain)

    report = commands.add_parser(
        "report", help="write RUN/report.html and RUN/MODEL_CARD.md (e.g. for an older run)",
        description="Writes RUN/report.html and RUN/report_files/: data, configuration, "
                    "training curves, per-class metrics, confusion matrix, calibration and "
                    "coverage, and the most confident test mistakes with Grad-CAM overlays. "
                    "The page opens from disk, with no server and no network.")
    report.add_argument("run", metavar="RUN", help="a finished run folder")
    report.set_defaults(func=cmd_report)

    export = commands.add_parser("export",
                                 help="export a run or an ensemble (SavedModel, TFLite, ONNX)")
    export.add_argument("run", nargs="?", metavar="RUN", help="run folder")
    export.add_argument("--ensemble", nargs="+", metavar="RUN",
                        help="runs whose probabilities the SavedModel averages (needs --out)")
    export.add_argument("--format", choices=("saved_model", "tflite", "onnx"),
                        default="saved_model",
                        help="saved_model (default), tflite or onnx (raw-pixel input; onnx "
                             'needs pip install "tlapp[onnx]")')
    export.add_argument("--quantize", choices=("none", "dynamic", "float16", "int8"),
                        default="none",
                        help="TFLite weights: none (float32), dynamic (int8), float16, or int8 "
                             "(full-integer, calibrated on the run's training images). The "
                             "test accuracy of the file against the Keras model's is printed "
                             "and written to export.json")
    export.add_argument("--calibration-images", type=int, metavar="N",
                        help="--quantize int8: how many of the run's training images (a "
                             "seeded random sample) calibrate the activation ranges "
                             "(default 200; all of them if fewer)")
    export.add_argument("--int8-input", choices=("uint8", "int8", "float32"),
                        help="--quantize int8: the model's input and output type (default "
                             "uint8: pixels 0-255, quantised with the input's scale and zero "
                             "point in export.json)")
    export.add_argument("--tta", choices=TTA_MODES, default="none",
                        help="bake test-time augmentation into the SavedModel: flip or 10crop")
    export.add_argument("--out", help="destination folder (default RUN/saved_model, "
                                      "RUN/saved_model_TTA, RUN/tflite or RUN/onnx); must be "
                                      "new, empty or a previous tlapp export (with "
                                      "--overwrite)")
    export.add_argument("--reject-below", type=number_or_auto, metavar="P|auto",
                        help=REJECT_HELP + " (SavedModel: class_name 'unknown', class_index -1)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace a previous tlapp export at the destination (never "
                             "anything else)")
    export.set_defaults(func=cmd_export)


def cmd_evaluate(args) -> int:
    from tlapp.inference.evaluate import evaluate_run

    paths = ([args.run] if args.run else []) + (args.model or [])
    result = evaluate_run(paths, data=args.data, tta=args.tta, out=args.out,
                          batch_size=args.batch_size, reject_below=args.reject_below)
    if "per_label" in result:  # a multi-label run
        print(f"exact label sets {result['accuracy']:.4f}, decisions "
              f"{result['label_accuracy']:.4f} on {result['count']} images (tta {args.tta}); "
              f"micro F1 {result['micro_f1']:.4f}, macro F1 {result['macro_f1']:.4f}, mAP "
              f"{_number(result['mAP'])}")
        for name, row in result["per_label"].items():
            print(f"  {name:20s} precision {row['precision']:.3f}  recall {row['recall']:.3f}  "
                  f"f1 {row['f1']:.3f}  AP {_number(row['average_precision'])}  threshold "
                  f"{row['threshold']:.3f}  support {row['support']}")
        print(f"wrote metrics.json and per_label.csv in {result['out']}")
        return 0
    top5 = f", top-5 accuracy {result['top5_accuracy']:.4f}" if "top5_accuracy" in result else ""
    print(f"accuracy {result['accuracy']:.4f}{top5} on {result['count']} images "
          f"(tta {args.tta}, {len(paths)} model{'s' if len(paths) > 1 else ''}); "
          f"macro F1 {result['macro_f1']:.4f}, weighted F1 {result['weighted_f1']:.4f}")
    if "selective" in result:
        chosen = result["selective"]
        print(f"reject below {chosen['reject_below']:.3f}: answered {chosen['coverage']:.1%} "
              f"of the images, accuracy on them {_number(chosen['selective_accuracy'])}")
    for name, row in result["per_class"].items():
        print(f"  {name:20s} precision {row['precision']:.3f}  recall {row['recall']:.3f}  "
              f"f1 {row['f1']:.3f}  support {row['support']}")
    print(f"wrote metrics.json, confusion_matrix.csv, misclassified.csv and "
          f"plots/confusion_matrix.png in {result['out']}")
    return 0


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def cmd_predict(args) -> int:
    from tlapp.inference import runs as runs_lib

    runs = [runs_lib.load_run(path) for path in args.model]
    readable = False
    for result in runs_lib.iter_predictions(runs, args.images, top_k=args.top_k,
                                            batch_size=args.batch_size, tta=args.tta,
                                            reject_below=args.reject_below):
        readable = readable or "predictions" in result
        if args.json:
            print(json.dumps(result), flush=True)
        elif "error" in result:
            print(f"{result['path']}: error: {result['error']}", flush=True)
        else:
            best = ", ".join(f"{p['label']} {p['probability']:.3f}" for p in result["predictions"])
            answer = "unknown (below --reject-below): " if result.get("label", "") is None \
                else ""
            print(f"{result['path']}: {answer}{best or '(no label above its threshold)'}",
                  flush=True)
    if not readable:
        raise UserInputError("none of the inputs could be read as an image")
    return 0


def cmd_explain(args) -> int:
    from tlapp.inference import runs as runs_lib
    from tlapp.inference.explain import write_explanations

    run = runs_lib.load_run(args.model)
    results = run.explain(args.images, args.class_name)
    out = write_explanations(results, run.labels, args.out or run.path / "explain")
    for result in results:
        if "error" in result:
            print(f"{result['path']}: error: {result['error']}", flush=True)
        else:
            probabilities = list(result["probabilities"])
            best = probabilities.index(max(probabilities))
            print(f"{result['path']}: {run.labels[best]} "
                  f"{result['probabilities'][best]:.3f} -> {result['png']}", flush=True)
    if not out:
        raise UserInputError("none of the inputs could be read as an image")
    return 0


def cmd_report(args) -> int:
    from tlapp.inference import runs as runs_lib
    from tlapp.inference.report import write_report
    from tlapp.reporting.model_card import write_model_card

    run = runs_lib.load_run(args.run)
    if not run.metrics:
        raise UserInputError(f"{run.path} has no metrics.json: it is not a finished run, so "
                             f"there is nothing to report yet.")
    print(f"wrote {write_report(run.path, run.model, run.metrics)}")
    print(f"wrote {write_model_card(run.path)}")
    return 0


def cmd_export(args) -> int:
    from tlapp.inference import export, runs as runs_lib
    from tlapp.reporting import model_card

    paths = ([args.run] if args.run else []) + (args.ensemble or [])
    if not paths:
        raise UserInputError("Nothing to export: give RUN, or --ensemble RUN1 RUN2 ... --out DIR.")
    runs = [runs_lib.load_run(path) for path in paths]
    out = export.export_runs(runs, args.out, format=args.format, tta=args.tta,
                             quantize=args.quantize, overwrite=args.overwrite,
                             reject_below=args.reject_below,
                             calibration_images=args.calibration_images,
                             int8_input=args.int8_input)
    model_card.write_export_card([r.path for r in runs], out)  # and RUN/MODEL_CARD.md if missing
    kind = {"saved_model": "SavedModel", "tflite": "TFLite model", "onnx": "ONNX model"}
    print(f"exported {kind[args.format]} to {out}")
    if args.format != "saved_model":
        print(describe_export_check(json.loads((out.parent / "export.json").read_text())))
    return 0


def describe_export_check(description: dict) -> str:
    """One line: the exported file's test accuracy against the Keras model's."""
    test = description.get("test") or {}
    if "accuracy" not in test:
        return f"not compared with the Keras model: {test.get('skipped', 'no run')}"
    name = description["format"].upper().replace("TFLITE", "TFLite") + (
        f" {description['quantize']}" if description.get("quantize", "none") != "none" else "")
    return (f"test accuracy ({test['images']} images): Keras {test['keras_accuracy']:.4f}, "
            f"{name} {test['accuracy']:.4f} (drop {test['accuracy_drop']:+.4f}); same "
            f"prediction on {test['agreement']:.1%}; largest probability difference "
            f"{test['max_probability_difference']:.2g}")
