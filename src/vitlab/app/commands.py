"""What each `vitlab` command does, given its parsed flags (the parser and the error rule are in
`cli.py`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import VARIANTS, ModelConfig, TrainConfig, family, legacy_name
from ..data import DataError, read_image
from ..errors import ConfigError
from ..formats import official, sources
from ..formats.checkpoints import load_model
from ..formats.files import HUB_PREFIX, atomic_write, cache_dir, check_output, fetch_hub
from ..runtime import resolve_device, resolve_precision


def cmd_models(args: argparse.Namespace) -> int:
    from ..model import count_parameters, create_model

    rows = [
        (
            "family",
            "name",
            "legacy name",
            "patch",
            "width",
            "depth",
            "heads",
            "MLP",
            "params (10 classes, 224 px)",
        )
    ]
    for name, config in VARIANTS.items():
        with torch.device("meta"):  # counts without allocating weights
            params = count_parameters(create_model(name, num_classes=10, img_size=224))
        if len(rows) > 1 and family(name) != family(rows[-1][1]):
            rows.append(None)  # a blank line between families
        rows.append(
            (
                family(name),
                name,
                legacy_name(name) if legacy_name(name) != name else "",
                str(config.patch_size),
                str(config.hidden_size),
                str(config.depth),
                str(config.num_heads),
                str(config.mlp_dim),
                f"{params:,}",
            )
        )
    widths = [max(len(r[i]) for r in rows if r) for i in range(len(rows[0]))]
    for row in rows:
        print(
            ""
            if row is None
            else "  ".join(
                cell.ljust(w) if i < 3 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=False))
            )
        )
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    if args.list or not args.names:
        print(f"official checkpoints, from {official.base_url()} (cached in {cache_dir()}):")
        for name, entry in official.OFFICIAL_CHECKPOINTS.items():
            print(
                f"  {name:<20} {entry.variant:<9} {entry.num_classes:>6} classes  "
                f"{entry.img_size} px  {entry.description}"
            )
        print(sources.listing())
        print(_hub_sources())
        return 0
    known = (*official.OFFICIAL_CHECKPOINTS, *sources.SOURCES)
    for name in args.names:
        if name not in known and not name.startswith(HUB_PREFIX):
            raise ConfigError(
                f"unknown checkpoint {name!r}; `vitlab download --list` shows the names"
            )
    for name in args.names:
        if name in official.OFFICIAL_CHECKPOINTS:
            print(official.fetch_official(name))
        else:  # a Hub name, or a family variant's timm repository
            print(fetch_hub(sources.default_source(name) or name))
    return 0


def _hub_sources() -> str:
    try:
        from huggingface_hub import constants

        where, note = f"from {constants.ENDPOINT} (cached in {constants.HF_HUB_CACHE})", ""
    except ImportError:
        where, note = (
            "from the Hugging Face Hub",
            " (needs huggingface_hub: pip install 'vitlab[hub]')",
        )
    return (
        f"Hub repositories, as {HUB_PREFIX}ORG/NAME[@REVISION], {where}{note}:\n"
        f"  transformers ViTs        e.g. {HUB_PREFIX}google/vit-base-patch16-224\n"
        "  timm ViTs                e.g. "
        f"{HUB_PREFIX}timm/vit_base_patch16_224.augreg2_in21k_ft_in1k\n"
        "local files: a run's .pt, vitlab .safetensors, official .npz (with --model_type), timm "
        "state dicts (.safetensors, .bin, .pth), transformers and timm folders, Meta's DINOv2 "
        ".pth, CLIP state dicts of OpenAI and OpenCLIP (with --model_type), big_vision's SigLIP "
        ".npz"
    )


def cmd_train(config: TrainConfig) -> int:
    from ..train import train

    # Again with the real world size inside train(); this catches bad flags before any set-up.
    config.validate()
    train(config)
    return 0


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be positive")


def cmd_eval(args: argparse.Namespace) -> int:
    from ..batches import eval_batches
    from ..evaluate import evaluate, evaluate_multi_label

    _positive(args, "batch_size")
    source = Path(args.checkpoint)
    out_dir = Path(args.out) if args.out else source.parent if source.is_file() else Path("eval")
    stem = f"{source.stem}_{Path(args.labels).stem if args.labels else args.dataset}"
    model, class_names = load_model(args.checkpoint, args.model_type)
    picture = "average_precision" if model.config.multi_label else "confusion"
    json_path, png_path = out_dir / f"{stem}_eval.json", out_dir / f"{stem}_{picture}.png"
    for path in (json_path, png_path):  # before the evaluation's work, not after it
        check_output(path, args.overwrite, inputs=(source,))
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    data, where = _test_images(args, model.config.multi_label, class_names)
    print(
        f"evaluating {args.checkpoint} on {where} ({len(data)} images), {device.type}, {precision}"
    )
    batches = eval_batches(
        data, model.config, args.batch_size, device, num_workers=args.num_workers
    )
    run = evaluate_multi_label if model.config.multi_label else evaluate
    extra = {"threshold": args.threshold} if model.config.multi_label else {}
    metrics = run(
        model.to(device),
        batches,
        len(class_names),
        device,
        precision=precision,
        total=math.ceil(len(data) / args.batch_size),
        **extra,
    )
    report = {
        "checkpoint": str(args.checkpoint),
        **({"labels": args.labels} if args.labels else {}),
        **({} if args.labels else {"dataset": args.dataset, "data_dir": str(args.data_dir)}),
        "device": device.type,
        "precision": precision,
        "class_names": class_names,
        **metrics,
    }
    atomic_write(json_path, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    _draw_report(metrics, class_names, f"{source.name} on {where}", png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


def _test_images(args: argparse.Namespace, multi_label: bool, class_names: list[str]):
    """(the images to evaluate on, where they are from): a labels CSV's, or a dataset's test
    split."""
    from ..data import load_image_list, load_test_split

    if args.labels:
        data = load_image_list(args.labels, multi_label=multi_label, class_names=class_names)
        return data, str(args.labels)
    if multi_label:
        raise ConfigError("a multi-label model is evaluated on --labels CSV (its images' labels)")
    return load_test_split(
        args.dataset, args.data_dir, class_names
    ), f"{args.dataset} {args.data_dir}"


def _draw_report(metrics: dict, class_names: list[str], title: str, png_path: Path) -> None:
    """The report printed, and drawn: the confusion matrix, or a multi-label model's per-class
    average precision."""
    from ..evaluate import (
        draw_average_precision,
        draw_confusion,
        format_multi_label_report,
        format_report,
    )

    if "mAP" in metrics:
        print(format_multi_label_report(metrics, class_names))
        draw_average_precision(metrics, class_names, f"{title}: mAP {metrics['mAP']:.2%}", png_path)
    else:
        print(format_report(metrics, class_names))
        title = f"{title}: top-1 {metrics['accuracy']:.2%}"
        draw_confusion(metrics["confusion"], class_names, title, png_path)


def cmd_predict(args: argparse.Namespace) -> int:
    from .inference import list_images, predict

    _positive(args, "top_k", "batch_size")
    if not 0 < args.threshold < 1:
        raise ConfigError(f"--threshold must be in (0, 1), got {args.threshold}")
    model, class_names = load_model(args.checkpoint, args.model_type)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    model.to(device)
    files, problems = list_images(args.images)
    for problem in problems:
        print(f"vitlab predict: skipped {problem}", file=sys.stderr)
    failed, results = len(problems), []
    # A bar on stderr where there is more than one batch (the table or JSON on stdout stays clean).
    bar = tqdm(
        total=len(files),
        desc="predict",
        unit="image",
        disable=len(files) <= args.batch_size,
        dynamic_ncols=True,
    )
    for start in range(0, len(files), args.batch_size):
        batch = files[start : start + args.batch_size]
        kept, images = _read_batch(batch, model.config, bar)
        failed += len(batch) - len(kept)
        bar.update(len(batch))
        if not kept:
            continue
        tops = predict(
            model,
            torch.stack(images),
            class_names,
            top_k=args.top_k,
            device=device,
            precision=precision,
            threshold=args.threshold,
        )
        key = "labels" if model.config.multi_label else "top_k"
        for path, top in zip(kept, tops, strict=True):
            if args.json:
                results.append({"image": str(path), key: _top_as_json(top)})
            else:
                print(_top_as_table(path, top))
    bar.close()
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


def _read_batch(
    paths: list[Path], config: ModelConfig, bar: tqdm
) -> tuple[list[Path], list[torch.Tensor]]:
    """(the paths that read, their images preprocessed as `config` says): an image that does not
    read is reported and skipped, so that the others still get their predictions."""
    from ..preprocessing import resized_side
    from .inference import preprocess

    kept, images = [], []
    for path in paths:
        try:
            images.append(preprocess(read_image(str(path), resized_side(config)), config))
        except DataError as e:
            bar.write(f"vitlab predict: skipped {e}", file=sys.stderr)
            continue
        kept.append(path)
    return kept, images


def _top_as_json(top: list[tuple[str, int, float]]) -> list[dict]:
    return [{"class": c, "index": i, "probability": p} for c, i, p in top]


def _top_as_table(path: Path, top: list[tuple[str, int, float]]) -> str:
    """The image's path, then one line per class: rank, name, probability."""
    width = max((len(c) for c, _, _ in top), default=0)
    rows = [f"  {rank:>2}  {c:<{width}}  {p:>7.2%}" for rank, (c, _, p) in enumerate(top, start=1)]
    return "\n".join([str(path), *(rows or ["  (no class over the threshold)"])])


def cmd_attention(args: argparse.Namespace) -> int:
    from ..preprocessing import resized_side
    from .inference import predict_with_attention, preprocess, seen_part
    from .rollout import attention_map, draw_attention

    suffix = "" if args.layer is None else f"_layer{args.layer}"
    out = (
        Path(args.out)
        if args.out
        else Path(args.image).with_name(f"{Path(args.image).stem}_attention{suffix}.png")
    )
    check_output(out, args.overwrite, inputs=(args.image, args.checkpoint))
    model, class_names = load_model(args.checkpoint, args.model_type)
    depth = model.config.depth
    if args.layer is not None and not 1 <= args.layer <= depth:
        raise ConfigError(f"--layer {args.layer}: the model's layers are numbered 1 to {depth}")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    # Drawn at most a few hundred pixels wide.
    image = read_image(args.image, max(resized_side(model.config), 512))
    logits, attentions = predict_with_attention(
        model.to(device), preprocess(image, model.config)[None], device=device, precision=precision
    )
    probabilities = logits.float().softmax(dim=-1)[0]
    best = int(probabilities.argmax())
    layer = None if args.layer is None else args.layer - 1
    config = model.config
    grid_map = attention_map(attentions, config.num_prefix_tokens, config.has_class_token, layer)[0]
    what = (
        f"attention rollout over {depth} layers"
        if layer is None
        else f"layer {args.layer} attention, heads averaged"
    )
    title = f"predicted: {class_names[best]} ({probabilities[best]:.1%})"
    # Over the part of the image the model saw
    draw_attention(seen_part(image, config), grid_map, out, title=title, what=what)
    print(f"{args.image}: {title}; wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..formats.export import export

    check_output(args.out, args.overwrite, inputs=(args.checkpoint,))
    model, class_names = load_model(args.checkpoint, args.model_type)
    print(export(model, class_names, args.format, args.out))
    out = Path(args.out)
    size = sum(p.stat().st_size for p in out.iterdir()) if out.is_dir() else out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import serve
    from .space import write_space

    _positive(args, "top_k")
    if args.write_space:
        if args.share or args.host != "127.0.0.1" or args.port != 7860:
            raise ConfigError(
                "--write-space: a Space chooses its own address and is public; leave out --host, "
                "--port and --share"
            )
        write_space(
            args.write_space,
            args.checkpoint,
            args.model_type,
            examples=args.examples,
            top_k=args.top_k,
            device=args.device,
            precision=args.precision,
        )
        return 0
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: choose a port from 1 to 65535")
    serve(
        args.checkpoint,
        args.model_type,
        args.examples,
        host=args.host,
        port=args.port,
        share=args.share,
        top_k=args.top_k,
        device=args.device,
        precision=args.precision,
    )
    return 0
