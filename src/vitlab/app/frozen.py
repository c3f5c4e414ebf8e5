"""The frozen-feature commands: `vitlab embed` (a backbone's features of a dataset, to a file),
`vitlab knn` (DINO's weighted k-NN on them) and `vitlab probe` (DINOv2's linear probe, written back
on the backbone as an ordinary model). The computations are in `vitlab/features.py`."""

from __future__ import annotations

import argparse
import hashlib
import json
import signal

import torch
from tqdm.auto import tqdm

from .. import features as frozen
from ..batches import eval_batches
from ..data import ImageSet, image_names, load_split
from ..errors import ConfigError, DataError
from ..formats.checkpoints import load_backbone
from ..formats.features import (
    ChunkedWriter,
    FeatureSet,
    check_same_features,
    is_features_file,
    read_features,
)
from ..formats.files import check_output
from ..formats.weights import save_safetensors, tensors_digest
from ..model import VisionTransformer
from ..runs import Stopped
from ..runtime import resolve_device, resolve_precision

DATA_HELP = (
    "an image folder (<class>/<image>; with train/ and val/ or test/ subfolders, --split picks one) "
    "or cifar10 / cifar100 (downloaded into --data_dir)"
)


def add_parsers(sub, *, add_source, add_runtime, add_overwrite) -> None:
    """The three commands' flags, with the source, device and overwrite flags the other commands
    share (cli.py's)."""
    _add_embed(sub, add_source=add_source, add_runtime=add_runtime, add_overwrite=add_overwrite)
    _add_knn(sub, add_runtime=add_runtime)
    _add_probe(sub, add_overwrite=add_overwrite)


def _add_embed(sub, *, add_source, add_runtime, add_overwrite) -> None:
    p = sub.add_parser("embed", help="features of a dataset by a backbone, written to a file")
    add_source(p)
    p.add_argument("data", metavar="DATA", help=DATA_HELP)
    p.add_argument("--out", required=True, help="the features file to write (.safetensors)")
    _add_data_flags(p)
    p.add_argument(
        "--chunk", type=int, default=4096, help="images per part on disk (default: 4096)"
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted embed of --out")
    add_overwrite(p, "--out")
    add_runtime(p)
    p.set_defaults(func=cmd_embed)


def _add_knn(sub, *, add_runtime) -> None:
    p = sub.add_parser("knn", help="DINO's weighted k-NN accuracy on frozen features")
    p.add_argument(
        "train", help="a features file of the training images, or a backbone's checkpoint"
    )
    p.add_argument("test", help="a features file of the test images, or (with a checkpoint) DATA")
    p.add_argument("--model_type", "--model-type", help="the variant of an official .npz file")
    p.add_argument(
        "--k", default=",".join(map(str, frozen.KNN_K)), help="neighbours (default: 10,20,100,200)"
    )
    p.add_argument(
        "--temperature", type=float, default=frozen.KNN_TEMPERATURE, help="(default: 0.07)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_data_flags(p, split=False)
    add_runtime(p)
    p.set_defaults(func=cmd_knn)


def _add_probe(sub, *, add_overwrite) -> None:
    p = sub.add_parser("probe", help="a linear classifier on frozen features, as a model file")
    p.add_argument("train", help="a features file of the training images")
    p.add_argument("test", help="a features file of the test images")
    p.add_argument(
        "--out", required=True, help="the model to write: the backbone with the probe's head"
    )
    p.add_argument(
        "--val_split",
        "--val-split",
        type=float,
        default=0.1,
        help="share of train held out to choose the learning rate (default: 0.1)",
    )
    p.add_argument(
        "--max_iter",
        "--max-iter",
        type=int,
        default=1000,
        help="L-BFGS iterations per fit (default: 1000)",
    )
    p.add_argument(
        "--strengths",
        default=",".join(f"{s:g}" for s in frozen.PROBE_STRENGTHS),
        help="the L2 strengths to sweep (1 / scikit-learn's C; one value: no sweep) (default: "
        "0.001 to 1000)",
    )
    p.add_argument("--seed", type=int, default=0, help="of the validation split (default: 0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    add_overwrite(p, "--out")
    p.set_defaults(func=cmd_probe)


def _add_data_flags(p: argparse.ArgumentParser, split: bool = True) -> None:
    if split:
        p.add_argument(
            "--split", choices=("train", "test"), default="train", help="(default: train)"
        )
    p.add_argument(
        "--data_dir", "--data-dir", default="data", help="CIFAR's download folder (default: data)"
    )
    p.add_argument(
        "--tokens",
        choices=tuple(frozen.TOKENS),
        default="cls",
        help="the class token, the patches' mean, or both side by side (default: cls)",
    )
    p.add_argument(
        "--blocks",
        type=int,
        default=1,
        help="pool the last N blocks' tokens, side by side (default: 1)",
    )
    p.add_argument("--batch_size", "--batch-size", type=int, default=64, help="(default: 64)")
    p.add_argument(
        "--num_workers",
        "--num-workers",
        type=int,
        default=2,
        help="decoding workers for folders streamed from disk (default: 2)",
    )


# ---------------------------------------------------------------------------------------------
# embed


def cmd_embed(args: argparse.Namespace) -> int:
    _positive(args, "chunk", "batch_size", "blocks")
    out = check_output(args.out, args.overwrite, inputs=(args.checkpoint,))
    model, backbone, device, precision = _feature_model(args, args.checkpoint)
    data, names = _read_data(args.data, args.split, args.data_dir)
    identity = {
        "backbone": backbone,
        "model_config": model.config.to_dict(),
        "images": hashlib.sha256(json.dumps([names, data.labels.tolist()]).encode()).hexdigest(),
        "precision": precision,
    }
    writer = ChunkedWriter(out, identity, total=len(data), chunk=args.chunk, resume=args.resume)
    pending = writer.pending()
    done = len(data) - sum(end - start for _, start, end in pending)
    with tqdm(total=len(data), initial=done, desc="embed", unit="image", dynamic_ncols=True) as bar:
        try:
            for index, start, end in pending:
                part = data.subset(torch.arange(start, end))
                writer.write(index, _embed(model, part, args, device, precision, bar), part.labels)
        except KeyboardInterrupt:
            raise Stopped(
                f"interrupted; the finished parts are kept in {writer.parts}: --resume continues",
                signal.SIGINT,
            ) from None
    features = writer.finish(
        names=names,
        class_names=data.class_names,
        source=str(args.checkpoint),
        model_type=args.model_type,
        backbone=backbone,
        config=model.config,
    )
    print(
        f"wrote {out}: {len(names)} images x {features.features.shape[1]} features (tokens "
        f"{args.tokens}, last {args.blocks} block(s)), {device.type}, {precision}"
    )
    return 0


def _feature_model(args, source) -> tuple[VisionTransformer, str, torch.device, str]:
    """(the backbone pooled as --tokens and --blocks say, on the device; its backbone's digest;
    the device; the precision)."""
    backbone = load_backbone(source, args.model_type)
    config = frozen.feature_config(backbone.config, args.tokens, args.blocks)
    model = frozen.feature_model(backbone, config)
    device = resolve_device(args.device)
    return (
        model.to(device),
        backbone_digest(model),
        device,
        resolve_precision(args.precision, device),
    )


def backbone_digest(model: VisionTransformer) -> str:
    """SHA-256 of the backbone's tensors (the head left out): features are of these weights."""
    state = model.state_dict()
    return tensors_digest({k: v.cpu() for k, v in state.items() if not k.startswith("head.")})


def _read_data(data: str, split: str, data_dir: str) -> tuple[ImageSet, list[str]]:
    dataset = data if data in ("cifar10", "cifar100") else "imagefolder"
    images = load_split(dataset, data_dir if dataset != "imagefolder" else data, split)
    return images, image_names(images, dataset, split)


def _embed(model, data: ImageSet, args, device, precision: str, bar) -> torch.Tensor:
    """Features of every image of `data`, in order, in float32 on the CPU."""
    out = []
    batches = eval_batches(
        data, model.config, args.batch_size, device, num_workers=args.num_workers
    )
    for images, _ in batches:
        out.append(frozen.embed(model, images, precision).cpu())
        bar.update(len(images))
    return torch.cat(out)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be positive")


# ---------------------------------------------------------------------------------------------
# knn


def cmd_knn(args: argparse.Namespace) -> int:
    try:
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError:
        raise ConfigError(f"--k {args.k!r}: expected numbers, e.g. 10,20,100,200") from None
    if not all(k >= 1 for k in ks) or not args.temperature > 0:
        raise ConfigError("--k and --temperature must be positive")
    if is_features_file(args.train):
        files = read_features(args.train), read_features(args.test)
        check_same_features(*files, args.train, args.test)
        (train, test), class_names = [(f.features, f.labels) for f in files], files[0].class_names
    else:  # a backbone, and a dataset whose two splits it embeds here
        _positive(args, "batch_size", "blocks")
        model, _, device, precision = _feature_model(args, args.train)
        splits = []
        for split in ("train", "test"):
            data, _ = _read_data(args.test, split, args.data_dir)
            with tqdm(total=len(data), desc=f"embed {split}", unit="image", leave=False) as bar:
                splits.append((_embed(model, data, args, device, precision, bar), data.labels))
            class_names = data.class_names
        train, test = splits
    results = frozen.knn_accuracy(
        train, test, num_classes=len(class_names), ks=ks, temperature=args.temperature
    )
    if args.json:
        print(json.dumps({str(k): {"top1": a, "top5": b} for k, (a, b) in results.items()}))
    else:
        print(f"k-NN (T = {args.temperature}) of {len(test[1])} images by {len(train[1])}")
        for k, (top1, top5) in results.items():
            print(f"  k {k:>4}  top-1 {top1:.2%}  top-5 {top5:.2%}")
    return 0


# ---------------------------------------------------------------------------------------------
# probe


def cmd_probe(args: argparse.Namespace) -> int:
    if not 0 < args.val_split < 1:
        raise ConfigError(f"--val_split must be in (0, 1), got {args.val_split}")
    _positive(args, "max_iter")
    try:
        strengths = tuple(float(v) for v in args.strengths.split(","))
    except ValueError:
        raise ConfigError(
            f"--strengths {args.strengths!r}: expected numbers, e.g. 0.1,1,10"
        ) from None
    if not all(v > 0 for v in strengths):
        raise ConfigError("--strengths must be positive")
    out = check_output(args.out, args.overwrite, inputs=(args.train, args.test))
    train, test = read_features(args.train), read_features(args.test)
    check_same_features(train, test, args.train, args.test)
    order = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(args.seed))
    n_val = round(len(order) * args.val_split)
    if not 0 < n_val < len(order):
        raise DataError(
            f"--val_split {args.val_split} of {len(order)} images leaves none to fit or to choose by"
        )
    val, fit = order[:n_val], order[n_val:]
    result = frozen.train_probe(
        (train.features[fit], train.labels[fit]),
        (train.features[val], train.labels[val]),
        num_classes=len(train.class_names),
        strengths=strengths,
        max_iter=args.max_iter,
    )
    predicted = (test.features @ result.weight.T + result.bias).argmax(dim=1)
    accuracy = (predicted == test.labels).float().mean().item()
    model = probe_model(train, result)
    save_safetensors(model, out, train.class_names)
    report = {
        "strength": result.strength,
        "val_accuracy": result.val_accuracy[result.strength],
        "test_accuracy": accuracy,
        "val_accuracy_by_strength": {f"{k:g}": v for k, v in result.val_accuracy.items()},
        "out": str(out),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"L2 strength {result.strength:g} (of {len(result.val_accuracy)}, chosen on {n_val} "
            f"held-out images: {report['val_accuracy']:.2%}); test accuracy "
            f"{accuracy:.2%} on {len(test.labels)} images; wrote {out}"
        )
    return 0


def probe_model(features: FeatureSet, result: frozen.ProbeResult) -> VisionTransformer:
    """The backbone the features came from, pooled as they were, with the probe's head."""
    backbone = load_backbone(features.source, features.model_type)
    config = features.config.replace(num_classes=len(features.class_names))
    model = frozen.feature_model(backbone, config)
    if backbone_digest(model) != features.backbone:
        raise DataError(
            f"{features.source}: its weights are not those the features were computed with; "
            "embed again"
        )
    with torch.no_grad():
        model.head.weight.copy_(result.weight)
        model.head.bias.copy_(result.bias)
    return model
