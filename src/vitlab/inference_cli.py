"""`vitlab eval`, `vitlab predict`, `vitlab attention` and `vitlab export`: a trained model put to use.

Each takes a checkpoint written by `vitlab train`, a vitlab `.safetensors` file, an official
checkpoint name, or an official `.npz` file with `--model_type`. Heavy imports wait until a
command runs, so that `vitlab --help` stays quick.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

SOURCE_HELP = "a checkpoint from `vitlab train` (.pt), a vitlab .safetensors file, an official checkpoint name, or an official .npz file"


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=SOURCE_HELP)
    p.add_argument("--model_type", "--model-type", help="the variant of an official .npz file, e.g. B/16 (`vitlab models`)")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    from .runtime import DEVICES_HELP, PRECISIONS, PRECISIONS_HELP

    p.add_argument("--device", default="auto", help=f"{DEVICES_HELP} (default: auto)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=f"{PRECISIONS_HELP} (default: auto)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy, per-class accuracy and confusion matrix on a test set")
    _add_source(p)
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "imagefolder"], default="cifar10", help="(default: cifar10, its test split)")
    p.add_argument("--data_dir", "--data-dir", default="data", help="CIFAR download folder, or the image folder's root "
                   "(<root>/<class>/<image>; its val/ or test/ subfolder when present) (default: data)")  # fmt: skip
    p.add_argument("--out", help="folder for the JSON and PNG (default: beside the checkpoint file, else ./eval)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=64, help="(default: 64)")
    p.add_argument("--num_workers", "--num-workers", type=int, default=2, help="decoding workers for folders streamed from disk (default: 2)")
    _add_runtime(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="the most probable classes of images")
    _add_source(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders searched recursively")
    p.add_argument("--top_k", "--top-k", type=int, default=5, help="classes shown per image (default: 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--batch_size", "--batch-size", type=int, default=32, help="(default: 32)")
    _add_runtime(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("attention", help="attention rollout over an image, drawn as a PNG")
    _add_source(p)
    p.add_argument("image", help="an image file")
    p.add_argument("--out", help="the PNG to write (default: <image stem>_attention.png beside the image)")
    p.add_argument("--layer", type=int, help="show layer N's own attention (1 = first), heads averaged, instead of the rollout")
    _add_runtime(p)
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("export", help="write the model as ONNX, TorchScript, safetensors or official .npz")
    _add_source(p)
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "safetensors", "npz"])
    p.add_argument("--out", required=True, help="the file to write")
    p.set_defaults(func=cmd_export)


def _usage_error(message: str) -> Exception:
    from .errors import ConfigError

    return ConfigError(message)


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoints import atomic_write
    from .data import eval_batches
    from .eval_report import draw_confusion, format_report
    from .evaluate import evaluate
    from .runtime import resolve_device, resolve_precision
    from .inference import evaluation_split, load_for_inference

    if args.batch_size < 1:
        raise _usage_error("--batch_size must be positive")
    model, class_names = load_for_inference(args.checkpoint, args.model_type)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    data = evaluation_split(args.dataset, args.data_dir, class_names)
    print(f"evaluating {args.checkpoint} on {args.dataset} {args.data_dir} ({len(data)} images), {device.type}, {precision}")
    batches = eval_batches(data, model.config.img_size, args.batch_size, device, num_workers=args.num_workers)
    metrics = evaluate(model.to(device), batches, len(class_names), device, precision, total=math.ceil(len(data) / args.batch_size))
    print(format_report(metrics, class_names))
    source = Path(args.checkpoint)
    out_dir = Path(args.out) if args.out else source.parent if source.is_file() else Path("eval")
    stem = f"{source.stem}_{args.dataset}"
    json_path, png_path = out_dir / f"{stem}_eval.json", out_dir / f"{stem}_confusion.png"
    report = {"checkpoint": str(args.checkpoint), "dataset": args.dataset, "data_dir": str(args.data_dir), "device": device.type,
              "precision": precision, "class_names": class_names, **metrics}  # fmt: skip
    atomic_write(json_path, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    draw_confusion(metrics["confusion"], class_names, f"{source.name} on {args.dataset}: top-1 {metrics['accuracy']:.2%}", png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from .data import DataError, read_image
    from .runtime import resolve_device, resolve_precision
    from .inference import list_images, load_for_inference, predict, preprocess

    if args.top_k < 1 or args.batch_size < 1:
        raise _usage_error("--top_k and --batch_size must be positive")
    model, class_names = load_for_inference(args.checkpoint, args.model_type)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    model.to(device)
    files, problems = list_images(args.images)
    for problem in problems:
        print(f"vitlab predict: skipped {problem}", file=sys.stderr)
    failed, results = len(problems), []
    for start in range(0, len(files), args.batch_size):
        kept, images = [], []
        for path in files[start : start + args.batch_size]:
            try:
                images.append(preprocess(read_image(str(path)), model.config.img_size))
                kept.append(path)
            except DataError as e:  # reported and skipped; the other images still get their predictions
                print(f"vitlab predict: skipped {e}", file=sys.stderr)
                failed += 1
        if not kept:
            continue
        for path, top in zip(kept, predict(model, torch.stack(images), class_names, args.top_k, device, precision)):
            if args.json:
                results.append({"image": str(path), "top_k": [{"class": c, "index": i, "probability": p} for c, i, p in top]})
            else:
                width = max(len(c) for c, _, _ in top)
                print(str(path))
                print("\n".join(f"  {rank:>2}  {c:<{width}}  {p:>7.2%}" for rank, (c, _, p) in enumerate(top, start=1)))
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


def cmd_attention(args: argparse.Namespace) -> int:
    import torch

    from .attention import attention_map, draw_attention
    from .data import read_image
    from .runtime import autocast
    from .runtime import resolve_device, resolve_precision
    from .inference import load_for_inference, preprocess

    model, class_names = load_for_inference(args.checkpoint, args.model_type)
    depth = model.config.depth
    if args.layer is not None and not 1 <= args.layer <= depth:
        raise _usage_error(f"--layer {args.layer}: the model's layers are numbered 1 to {depth}")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    image = read_image(args.image)
    images = preprocess(image, model.config.img_size)[None].to(device)
    with torch.no_grad(), autocast(device, precision):
        logits, attentions = model.to(device)(images, return_attention=True)
    probabilities = logits.float().softmax(dim=-1)[0]
    best = int(probabilities.argmax())
    layer = None if args.layer is None else args.layer - 1
    grid_map = attention_map(attentions, model.config.classifier == "token", layer)[0]
    what = f"attention rollout over {depth} layers" if layer is None else f"layer {args.layer} attention, heads averaged"
    title = f"predicted: {class_names[best]} ({probabilities[best]:.1%})"
    suffix = "" if layer is None else f"_layer{args.layer}"
    out = Path(args.out) if args.out else Path(args.image).with_name(f"{Path(args.image).stem}_attention{suffix}.png")
    draw_attention(image, grid_map, title, what, out)
    print(f"{args.image}: {title}; wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export
    from .inference import load_for_inference

    model, class_names = load_for_inference(args.checkpoint, args.model_type)
    print(export(model, class_names, args.format, args.out))
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB)")
    return 0
