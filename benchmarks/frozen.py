"""Frozen features' speed: `vitlab embed` images/s at ViT-B/16 224 px and at a small shape, and the wall time of
`vitlab probe` on 50,000 x 768 features.

Run from the repository root, in the project's environment, on a folder of class folders of images (e.g. the CIFAR-10
training split as JPEGs):

    python benchmarks/frozen.py DATA                      # small shape over all of DATA, B/16 over 512 images, probe
    python benchmarks/frozen.py DATA --b16-images 2048 --precision fp32
    python benchmarks/frozen.py DATA --smoke              # seconds: a few images, checks the plumbing only

What it measures. Both backbones are random (no checkpoint can be downloaded here; embedding does the same work
whatever the weights): "B/16" is ViT-B/16 at 224 px (the tutorial's shape), "small" is width 768, depth 2, patch 4 at
32 px (CIFAR's own size; its features are 768 wide, as B/16's). `embed` runs as the command does, decoding and
resizing included, with the class token as the feature, at --precision (auto: bf16 where native); images/s is over
the whole run after the model is built. The probe then runs on the small backbone's features of every image of DATA
(50,000 x 768 for CIFAR-10's training split): 90% to fit, 10% held out as its test split, the command's default sweep
of L2 strengths chosen on 10% of the fit, then the refit; its wall time is the command's, end to end (reading the
features, writing the model). The printed line names the CPU, instruction set and torch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import vitlab  # before torch: the allocator settings the `vitlab` command runs with

# isort: split
import torch

from vitlab.app.cli import main as vitlab_main
from vitlab.fastpaths import cpu_name, instruction_set
from vitlab.formats.features import FeatureSet, read_features, write_features
from vitlab.formats.weights import save_safetensors

SHAPES = {
    "B/16": dict(name="B/16", img_size=224),
    "small": dict(name="B/16", img_size=32, patch_size=4, depth=2),
}


def subset(data: Path, images: int, root: Path) -> Path:
    """A class-folder tree of links to the first `images` images of DATA, taken across its classes in turn."""
    classes = sorted(p for p in data.iterdir() if p.is_dir())
    files = [sorted(c.iterdir()) for c in classes]
    chosen = [
        (c, f) for group in zip(*files, strict=False) for c, f in zip(classes, group, strict=True)
    ]
    for c, f in chosen[:images]:
        (root / c.name).mkdir(parents=True, exist_ok=True)
        (root / c.name / f.name).symlink_to(f.resolve())
    return root


def run(argv: list[str]) -> float:
    """`vitlab argv` in this process: its wall time; it must succeed."""
    start = time.perf_counter()
    code = vitlab_main(argv)
    if code != 0:
        sys.exit(f"vitlab {' '.join(argv)} failed with exit code {code}")
    return time.perf_counter() - start


def embed(shape: str, data: Path, scratch: Path, precision: str) -> tuple[Path, float, int]:
    """(the features file, the seconds `vitlab embed` took, images) of a random backbone of `shape`."""
    backbone = scratch / f"{shape.replace('/', '')}.safetensors"
    spec = dict(SHAPES[shape])
    save_safetensors(vitlab.create_model(spec.pop("name"), num_classes=10, **spec), backbone)
    out = scratch / f"{shape.replace('/', '')}-features.safetensors"
    seconds = run(["embed", str(backbone), str(data), "--out", str(out), "--precision", precision])
    return out, seconds, len(read_features(out).labels)


def probe(features_path: Path, scratch: Path) -> tuple[float, dict]:
    """`vitlab probe` on 90% of the features, tested on the other 10%: (its seconds, its report)."""
    features = read_features(features_path)
    order = torch.randperm(len(features.labels), generator=torch.Generator().manual_seed(0))
    cut = len(order) * 9 // 10
    paths = {}
    for name, index in (("fit", order[:cut]), ("test", order[cut:])):
        part = FeatureSet(
            features.features[index],
            features.labels[index],
            [features.names[i] for i in index.tolist()],
            features.class_names,
            features.source,
            features.model_type,
            features.backbone,
            features.config,
        )
        paths[name] = scratch / f"probe-{name}.safetensors"
        write_features(paths[name], part)
    argv = [
        "probe",
        str(paths["fit"]),
        str(paths["test"]),
        "--out",
        str(scratch / "probe.safetensors"),
    ]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        seconds = run([*argv, "--json"])
    return seconds, json.loads(printed.getvalue().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="a folder of class folders of images")
    parser.add_argument(
        "--b16-images", type=int, default=512, help="images B/16 embeds (default: 512)"
    )
    parser.add_argument(
        "--small-images", type=int, default=0, help="images the small shape embeds (default: all)"
    )
    parser.add_argument("--precision", default="auto", help="(default: auto)")
    parser.add_argument(
        "--smoke", action="store_true", help="a few images: checks the plumbing only"
    )
    args = parser.parse_args()
    if args.smoke:
        args.b16_images, args.small_images = 4, 40
    print(
        f"CPU {cpu_name()} ({instruction_set()}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        small_data = (
            args.data
            if not args.small_images
            else subset(args.data, args.small_images, scratch / "s")
        )
        b16_data = subset(args.data, args.b16_images, scratch / "b")
        _, seconds, n = embed("B/16", b16_data, scratch, args.precision)
        print(f"embed B/16 224 px: {n} images in {seconds:.1f} s, {n / seconds:.1f} images/s")
        features, seconds, n = embed("small", small_data, scratch, args.precision)
        print(
            f"embed width 768, patch 4, 32 px, depth 2: {n} images in {seconds:.1f} s, {n / seconds:.1f} images/s"
        )
        seconds, report = probe(features, scratch)
        width = read_features(features).features.shape[1]
        print(
            f"probe on {n} x {width} features (90% fit, 10% test): {seconds:.1f} s end to end, L2 strength "
            f"{report['strength']:g}, test accuracy {report['test_accuracy']:.2%}"
        )


if __name__ == "__main__":
    main()
