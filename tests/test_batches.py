"""The input pipeline: the batch order, process slices, the streaming path and evaluation shards,
on tiny in-memory data or a few dozen PNG files made in tmp_path."""

from __future__ import annotations

import pytest
import torch

from vitlab import data as vdata
from vitlab.augment import Augmentation
from vitlab.batches import TrainBatches, batch_indices, eval_batches
from vitlab.config import ModelConfig
from vitlab.data import load_image_folder

from rounding import assert_within, sum_bound
from test_data import make_image_folder, random_imageset

# ---------------------------------------------------------------------------------------------
# Batch order


def test_batch_indices_cover_each_image_once_per_epoch():
    n, batch = 10, 4  # batches cross epoch ends
    steps = [batch_indices(n, batch, step, seed=7) for step in range(10)]  # 40 images: 4 epochs
    assert all(len(s) == batch for s in steps)
    flat = torch.cat(steps)
    for epoch in range(4):
        assert sorted(flat[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))
    assert flat[:n].tolist() != flat[n : 2 * n].tolist()  # each epoch its own order
    # Deterministic: the same (seed, step) gives the same batch, whatever was asked before.
    assert torch.equal(batch_indices(n, batch, 6, seed=7), steps[6])
    assert not torch.equal(torch.cat([batch_indices(n, batch, s, seed=8) for s in range(10)]), flat)


def test_batch_larger_than_the_dataset():
    index = batch_indices(3, 7, 0, seed=0)
    assert len(index) == 7
    assert sorted(index[:3].tolist()) == [0, 1, 2] and sorted(index[3:6].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("augment", ["resized_crop", "pad_crop", "none"])
def test_process_slices_equal_the_whole_batch(augment):
    data = random_imageset(n=20, size=8)
    aug = Augmentation(8, augment, min_scale=0.3, hflip=True, pad=2)
    cpu = torch.device("cpu")
    whole = TrainBatches(data, aug, batch_size=8, seed=3, device=cpu)
    for step in (0, 1, 4):
        x, y = whole.get(step)
        assert x.shape == (8, 3, 8, 8)
        for world in (2, 4):
            local = 8 // world
            for rank in range(world):
                xr, yr = TrainBatches(
                    data, aug, batch_size=8, seed=3, device=cpu, rank=rank, world_size=world
                ).get(step)
                # Per-image weights alike; the crop's W-term column matmul and two-tap rows, blocked otherwise for
                # another batch size, on pixels in [-1, 1].
                bound = sum_bound(8, 1.0) + sum_bound(2, 1.0)
                assert_within(
                    xr,
                    x[rank * local : (rank + 1) * local],
                    bound,
                    f"{augment}, rank {rank} of {world}",
                )
                assert torch.equal(yr, y[rank * local : (rank + 1) * local])
    # The generator loop gives the same batches as get().
    for step, (xs, ys) in enumerate(whole(0, 3)):
        x, y = whole.get(step)
        assert torch.equal(xs, x) and torch.equal(ys, y)


# ---------------------------------------------------------------------------------------------
# Streaming from disk


def _folder_pair(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "imgs", per_class=8, size=16)
    memory = load_image_folder(root)
    monkeypatch.setattr(vdata, "IN_MEMORY_LIMIT_BYTES", 0)
    streamed = load_image_folder(root)
    assert memory.images is not None and memory.paths == streamed.paths
    assert streamed.images is None and len(streamed.paths) == 24
    assert torch.equal(memory.labels, streamed.labels)
    return memory, streamed


@pytest.mark.parametrize("augment", ["resized_crop", "pad_crop", "none"])
def test_streaming_gives_the_same_batches_shapes_and_labels(tmp_path, monkeypatch, augment):
    memory, streamed = _folder_pair(tmp_path, monkeypatch)
    aug = Augmentation(12, augment, min_scale=0.2, hflip=True, pad=2)
    cpu = torch.device("cpu")
    mem_batches = list(
        TrainBatches(memory, aug, batch_size=8, seed=5, device=cpu, num_workers=0)(2, 6)
    )
    stream_batches = list(
        TrainBatches(streamed, aug, batch_size=8, seed=5, device=cpu, num_workers=0)(2, 6)
    )
    assert len(mem_batches) == len(stream_batches) == 4
    for (xm, ym), (xs, ys) in zip(mem_batches, stream_batches, strict=False):
        assert xs.shape == xm.shape == (8, 3, 12, 12) and xs.dtype == torch.float32
        assert torch.equal(ys, ym)
        assert xs.min() >= -1.0 - 1e-6 and xs.max() <= 1.0 + 1e-6
    # A process's share of a streamed batch is the same images as in memory.
    rank1 = next(
        TrainBatches(
            streamed, aug, batch_size=8, seed=5, device=cpu, rank=1, world_size=2, num_workers=0
        )(2, 3)
    )
    assert torch.equal(rank1[1], mem_batches[0][1][4:])
    # Streamed batches are reproducible (seeded per image, not by the worker).
    again = list(TrainBatches(streamed, aug, batch_size=8, seed=5, device=cpu, num_workers=0)(2, 6))
    for (xa, _), (xb, _) in zip(again, stream_batches, strict=False):
        assert torch.equal(xa, xb)


def test_streaming_without_resizing_equals_memory(tmp_path, monkeypatch):
    memory, streamed = _folder_pair(tmp_path, monkeypatch)
    cpu = torch.device("cpu")
    # Native size, no flips: nothing random, so both paths give the same pixels. (With flips they
    # differ: streaming draws each image's choices from its own seed, memory from the batch's.)
    aug = Augmentation(16, "none", hflip=False)
    for (xm, ym), (xs, ys) in zip(
        TrainBatches(memory, aug, batch_size=8, seed=1, device=cpu, num_workers=0)(0, 3),
        TrainBatches(streamed, aug, batch_size=8, seed=1, device=cpu, num_workers=0)(0, 3),
        strict=False,
    ):
        assert torch.equal(ym, ys)
        assert torch.equal(xs, xm)
    mem_eval = list(
        eval_batches(memory, ModelConfig(img_size=16), 5, cpu, rank=1, world_size=2, num_workers=0)
    )
    stream_eval = list(
        eval_batches(
            streamed, ModelConfig(img_size=16), 5, cpu, rank=1, world_size=2, num_workers=0
        )
    )
    assert [len(y) for _, y in mem_eval] == [len(y) for _, y in stream_eval] == [5, 5, 2]
    for (xm, ym), (xs, ys) in zip(mem_eval, stream_eval, strict=False):
        assert torch.equal(ym, ys)
        assert torch.equal(xs, xm)


def test_eval_shards_cover_every_image_once(tmp_path):
    data = random_imageset(n=11, size=8)
    seen = []
    for rank in range(3):
        for x, y in eval_batches(
            data,
            ModelConfig(img_size=8, patch_size=8),
            2,
            torch.device("cpu"),
            rank=rank,
            world_size=3,
        ):
            assert x.shape[1:] == (3, 8, 8)
            seen += y.tolist()
    assert sorted(seen) == sorted(data.labels.tolist())
