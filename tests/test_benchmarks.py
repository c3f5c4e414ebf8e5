"""The benchmark scripts and their helper modules import (they are not run here: tests never time anything)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_script_imports(path, monkeypatch):
    # As Python runs a script: its folder first on the path, so that it finds its helper modules (peers.py)
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    # As Python registers a script it runs (its dataclasses need it)
    monkeypatch.setitem(sys.modules, spec.name, module)
    # Top-level imports and definitions; main() only runs as a script
    spec.loader.exec_module(module)
    if 'if __name__ == "__main__":' in path.read_text():  # a script, not a helper module
        assert callable(module.main)


def test_multilabel_mosaics_show_their_labels_and_train_and_test_share_no_image(
    tmp_path, monkeypatch
):
    import numpy as np
    from PIL import Image

    monkeypatch.syspath_prepend(str(BENCHMARKS[0].parent))
    import multilabel

    # 5 classes of 8 plain images, image n of colour (n, 0, 0): a mosaic's tiles say which it shows
    classes = ["ant", "bee", "cat", "dog", "eel"]
    for c, name in enumerate(classes):
        (tmp_path / "src" / name).mkdir(parents=True)
        for k in range(8):
            tile = np.zeros((32, 32, 3), dtype=np.uint8)
            tile[..., 0] = 8 * c + k
            Image.fromarray(tile).save(tmp_path / "src" / name / f"{k}.png")
    train_csv, test_csv = multilabel.build(tmp_path / "src", tmp_path / "work", uses=2, seed=0)
    shown = {}
    for csv in (train_csv, test_csv):
        for path, labels in multilabel.read_labels(csv):
            mosaic = np.asarray(Image.open(tmp_path / "work" / path))
            assert mosaic.shape == (64, 64, 3)
            tiles = {int(mosaic[y, x, 0]) for y in (0, 32) for x in (0, 32)}
            assert len(tiles) == 4 and labels == {classes[n // 8] for n in tiles}
            shown.setdefault(csv.stem, set()).update(tiles)
    # 40 images: 4 (10%) make the one test mosaic, the other 36 nine training mosaics a use
    assert len(shown["test"]) == 4 and shown["test"].isdisjoint(shown["train"])
    assert len(shown["train"]) == 36 and len(multilabel.read_labels(train_csv)) == 18
