"""Every random stream of a run, derived from (the run's seed, a named stream, an index such as the
step), so that a resumed run, or a batch split over processes or accumulation steps, draws exactly
what the uninterrupted run would have drawn.

Why the streams cannot collide: torch seeds its CPU generator with the low 32 bits of a seed only
(`manual_seed(5)` and `manual_seed(5 + 2**48)` draw the same numbers), so a seed's high bits
separate nothing. Each stream of a run instead owns its own range of the 32-bit seeds (`STREAMS`:
its size bounds the index), offset for the whole run by a hash of the run's seed: within one run,
two different (stream, index) pairs always get two different 32-bit seeds.
"""

from __future__ import annotations

import hashlib
import itertools

import torch

# Each stream and how many indices it may take, laid out one after the other in the 2**32 seeds.
_SIZES = {
    "init": 1,  # the model's initialisation (torch's global generator)
    "validation_split": 1,  # which images are held out
    "epoch_order": 2**24,  # index: the epoch, the order of its images
    "augmentation": 2**28,  # index: the step, its crops, flips and other per-image choices
    "mixing": 2**28,  # index: the step, its mixup and CutMix pairs
    "image": 2**30,  # index: step * batch_size + position, one streamed image's choices
    "loader": 1,  # a DataLoader's own generator (its workers' base seeds, which nothing uses)
    "dropout": 2**31,  # index: step * world_size + rank, a process's dropout and stochastic depth
}
_OFFSETS = dict(zip(_SIZES, itertools.accumulate([0, *_SIZES.values()]), strict=False))
STREAMS = tuple(_SIZES)
assert sum(_SIZES.values()) <= 2**32


def longest_run(batch_size: int, world_size: int) -> int:
    """The most steps a run can take before a stream runs out of seeds (millions, at any batch)."""
    return min(
        _SIZES["augmentation"], _SIZES["image"] // batch_size, _SIZES["dropout"] // world_size
    )


def stream_seed(seed: int, stream: str, index: int = 0) -> int:
    """The 32-bit seed of `stream`'s `index`-th draw in the run seeded with `seed`."""
    if not 0 <= index < _SIZES[stream]:
        raise ValueError(
            f"random stream {stream!r} takes an index below {_SIZES[stream]}, got {index}"
        )
    base = int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=4).digest(), "little")
    return (base + _OFFSETS[stream] + index) % 2**32


def generator(seed: int, stream: str, index: int = 0) -> torch.Generator:
    """A CPU generator for `stream`'s `index`-th draw (CPU: the same numbers on any device)."""
    return torch.Generator().manual_seed(stream_seed(seed, stream, index))
