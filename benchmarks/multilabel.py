"""Multi-label end to end (issue 27): a ViT trained from scratch on 2x2 mosaics of CIFAR-10 images,
each labelled with the classes it shows, then `vitlab eval` (mAP, per-class AP, F1) and `vitlab
predict` of the best checkpoint.

Run from the repository root, in the project's environment, with DATA_DIR a CIFAR-10 training folder
(<class>/<image>, 32 px):

    python benchmarks/multilabel.py DATA_DIR            # sized for 10 minutes on 2 CPU cores (90 images/s)
    python benchmarks/multilabel.py DATA_DIR --work DIR --steps 20   # a quick look

The data. The images are shuffled by --seed and split 90/10 into DISJOINT pools: the training mosaics
are drawn from the first, the test mosaics from the second, so that no test mosaic shows a picture
any training mosaic shows. A mosaic is four images drawn at random from its pool, pasted 2x2 into 64
x 64 pixels, labelled with the set of their classes (1 to 4 of the 10; 3.4 on average, each class in
about a third of the mosaics). Every training image appears in --uses mosaics (a different
arrangement each time), every test image in one. Mosaics are PNGs (no second lossy step) with
train.csv and test.csv (`path,label;label;...`) under --work.

The run. `vitlab train --recipe scratch-cifar10-cpu --multi_label` at 64 px with patch 16 (16
tokens, 4 a CIFAR image: a quarter of the recipe's 64, for a 10-minute budget on a shared 2-core
CPU, where patch 8 trained at about 50 images/s) and no patch dropping (with 16 tokens it would
hide a whole image, and so one of the labels, from 4% of the mosaics), 400 steps of 128 images, on
train.csv, 5% of it held out for validation (best.pt picked by its mAP), then tested on test.csv; `vitlab eval best.pt --labels test.csv` and `vitlab predict` on the first test
mosaics. It prints the figures and, for scale, the chance baseline: a predictor that gives every
image each class's training frequency (a constant per class: its AP is the class's share of the
test images).

Measured (benchmarks/RESULTS.md, 2026-12-05, a shared 2-core Xeon: 21.5 minutes at 40 images/s): test mAP 55.3%
against 34.2% by the training frequencies, per-class AP 47.5% to 64.0%.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

MOSAIC = 2  # images a side
TILE = 32  # CIFAR's side


def source_images(data_dir: Path) -> tuple[list[Path], list[str]]:
    """Every image of `data_dir`/<class>/ (sorted), and its class."""
    paths, classes = [], []
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        found = sorted(folder.glob("*.[jp][pn]g"))
        paths += found
        classes += [folder.name] * len(found)
    if not paths:
        raise SystemExit(f"{data_dir}: no <class>/*.jpg or *.png images")
    return paths, classes


def draw_mosaics(pool: np.ndarray, uses: int, rng: np.random.Generator) -> np.ndarray:
    """(mosaics, 4) indices into the images: each of `pool` used `uses` times, in random groups of
    four (a group's images distinct)."""
    whole = len(pool) // MOSAIC**2 * MOSAIC**2  # each use's groups from one permutation
    return np.concatenate([rng.permutation(pool)[:whole] for _ in range(uses)]).reshape(
        -1, MOSAIC**2
    )


def write_mosaics(
    groups: np.ndarray, paths: list[Path], classes: list[str], out: Path, split: str
) -> Path:
    """Each group as a 64 px PNG under out/<split>/, and out/<split>.csv of their classes."""
    from PIL import Image

    (out / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for n, group in enumerate(groups):
        canvas = Image.new("RGB", (MOSAIC * TILE, MOSAIC * TILE))
        for k, i in enumerate(group):
            with Image.open(paths[i]) as image:
                tile = image.convert("RGB").resize((TILE, TILE))
            canvas.paste(tile, ((k % MOSAIC) * TILE, (k // MOSAIC) * TILE))
        name = f"{split}/{n:05d}.png"
        canvas.save(out / name)
        rows.append(f"{name},{';'.join(sorted({classes[i] for i in group}))}\n")
    (out / f"{split}.csv").write_text("".join(rows))
    return out / f"{split}.csv"


def build(data_dir: Path, out: Path, uses: int, seed: int) -> tuple[Path, Path]:
    """train.csv and test.csv of mosaics from disjoint halves (90/10) of `data_dir`'s images."""
    paths, classes = source_images(data_dir)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paths))
    test_pool, train_pool = order[: len(paths) // 10], order[len(paths) // 10 :]
    train = write_mosaics(draw_mosaics(train_pool, uses, rng), paths, classes, out, "train")
    test = write_mosaics(draw_mosaics(test_pool, 1, rng), paths, classes, out, "test")
    return train, test


def vitlab(*args: str, capture: bool = True) -> str:
    """`vitlab ARGS` in this environment, the command echoed first; its output (or, uncaptured,
    shown as it runs); exits where it fails."""
    command = [sys.executable, "-m", "vitlab.app.cli", *args]
    print("$ vitlab " + " ".join(args), flush=True)
    done = subprocess.run(command, capture_output=capture, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write((done.stderr or "")[-3000:])
        raise SystemExit(f"vitlab {args[0]} failed ({done.returncode})")
    return done.stdout or ""


def read_labels(csv: Path) -> list[tuple[str, set[str]]]:
    """(path, classes) of each row of a CSV this script wrote."""
    rows = [line.split(",") for line in csv.read_text().splitlines()]
    return [(path, set(labels.split(";"))) for path, labels in rows]


def chance(train_csv: Path, test_csv: Path) -> tuple[float, float]:
    """For scale: the mAP of the label-frequency predictor (each class's training frequency its
    score for every test image), and the micro F1 of calling every class present."""
    import torch

    from vitlab.evaluate import multi_label_metrics

    train, test = read_labels(train_csv), read_labels(test_csv)
    names = sorted(set().union(*(labels for _, labels in train)))
    targets = torch.tensor([[float(n in labels) for n in names] for _, labels in test])
    frequency = torch.tensor([[float(n in labels) for n in names] for _, labels in train]).mean(0)
    by_frequency = multi_label_metrics(torch.logit(frequency).expand_as(targets), targets, 0.5)
    every_class = multi_label_metrics(torch.ones_like(targets), targets, 0.5)
    return by_frequency["mAP"], every_class["f1_micro"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", type=Path, help="a CIFAR-10 training folder, <class>/<image>")
    p.add_argument(
        "--work", type=Path, default=Path("output/multilabel-bench"), help="mosaics, run"
    )
    p.add_argument("--steps", type=int, default=400, help="training steps (default: 400)")
    p.add_argument("--batch", type=int, default=128, help="images a step (default: 128)")
    p.add_argument("--uses", type=int, default=2, help="mosaics per training image (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="the mosaics' seed (default: 0)")
    p.add_argument("--predict", type=int, default=4, help="test mosaics to predict (default: 4)")
    return p


def main() -> None:
    args, extra = parser().parse_known_args()
    work = args.work.resolve()
    if (work / "train.csv").is_file() and (work / "test.csv").is_file():
        train_csv, test_csv = work / "train.csv", work / "test.csv"  # built by an earlier run
    else:
        train_csv, test_csv = build(args.data_dir, work, args.uses, args.seed)
    print(f"{len(read_labels(train_csv))} training, {len(read_labels(test_csv))} test mosaics")
    run = work / "run"
    vitlab(
        *("train", "--recipe", "scratch-cifar10-cpu", "--name", "multilabel", "--overwrite"),
        *("--dataset", "imagefolder", "--labels", str(train_csv), "--test_labels", str(test_csv)),
        *("--multi_label", "--img_size", "64", "--patch_size", "16", "--patch_drop_rate", "0"),
        "--val_split",
        "0.05",
        *("--num_steps", str(args.steps), "--warmup_steps", str(max(1, args.steps // 16))),
        *("--eval_every", str(max(1, args.steps // 5)), "--train_batch_size", str(args.batch)),
        *("--output_dir", str(run), "--log_dir", str(run / "logs"), "--device", "cpu", *extra),
        capture=False,
    )
    best = run / "multilabel" / "best.pt"
    final = json.loads((run / "multilabel" / "final_metrics.json").read_text())
    print(json.dumps(final, indent=2))
    print(
        vitlab(
            "eval", str(best), "--labels", str(test_csv), "--out", str(work / "eval"), "--overwrite"
        )
    )
    report = json.loads((work / "eval" / "best_test_eval.json").read_text())
    rows = read_labels(test_csv)[: args.predict]
    print(vitlab("predict", str(best), *(str(work / p) for p, _ in rows), "--threshold", "0.5"))
    for path, labels in rows:
        print(f"{path}: true labels {', '.join(sorted(labels))}")
    chance_map, chance_f1 = chance(train_csv, test_csv)
    ap = [a for a in report["per_class_ap"] if a is not None]
    print(
        f"test mAP {report['mAP']:.4f} (per-class AP {min(ap):.4f} to {max(ap):.4f}), F1 at 0.5 "
        f"{report['f1_micro']:.4f} micro, {report['f1_macro']:.4f} macro; chance: mAP "
        f"{chance_map:.4f} (training frequencies), F1 {chance_f1:.4f} (every class called); "
        f"{final['train_seconds']:.0f} s training, {final['images_per_second']:.0f} images/s"
    )


if __name__ == "__main__":
    main()
