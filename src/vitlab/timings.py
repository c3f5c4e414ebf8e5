"""Which of two ways of computing the same thing runs faster on this machine: timed once, on the
shapes in use, and the verdict kept for the next run.

A fast path's benefit depends on the CPU: oneDNN's linear layers won in fp32 on an AMD EPYC and lost
on an Intel Xeon with AMX, whose torch.mm is the faster matmul there (issue 28). So where it
matters, the path is timed against the plain one on the first call with a new shape (the least of
a few alternated repeats, a fraction of a second; a win is measured again before it counts), and
the faster kept. Verdicts are cached per CPU model, torch version and thread count in
`cache_file()`: a JSON list, one verdict a line with its figures, written atomically and safe to
delete. A missing, corrupt or wrong cache costs only speed: both ways compute the same values to
float rounding, and each fast path still checks itself before use (fastpaths.SelfChecked).
"""

from __future__ import annotations

import functools
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .formats.files import atomic_write, cache_dir

REPEATS = 5  # timed calls of each way, alternated, after one untimed call each
FIELDS = ("cpu", "torch", "threads", "path", "case", "fast_ms", "plain_ms")

_verdicts: dict[tuple, dict] = {}  # every verdict known to this process, by `_key`
_loaded = False  # whether the cache file has been read in this process


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (Linux), else what Python knows of the machine."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cache_file() -> Path:
    return cache_dir() / "fastpaths.json"


def _machine() -> dict:
    # str(): torch's version compares to the cache file's string by parsing both, 35 us a lookup,
    # and every linear layer's call looks its verdict up
    return {"cpu": cpu_name(), "torch": str(torch.__version__), "threads": torch.get_num_threads()}


def _key(line: dict) -> tuple:
    return tuple(line[field] for field in FIELDS[:5])


def _load() -> None:
    """The cache file's verdicts, added to this process's; a file that cannot be read or parsed,
    or a line without every field, is ignored (and replaced at the next verdict)."""
    global _loaded
    _loaded = True
    try:
        lines = json.loads(cache_file().read_text())
        valid = isinstance(lines, list) and all(
            isinstance(line, dict)
            and set(FIELDS) <= set(line)
            and all(isinstance(line[f], (int, float)) for f in FIELDS[-2:])
            for line in lines
        )
    except (OSError, UnicodeDecodeError, ValueError):
        return
    if valid:
        for line in lines:
            _verdicts.setdefault(_key(line), line)


def _save() -> None:
    """Every known verdict written to the cache file, one a line; a cache that cannot be written
    is left as it is (the verdicts hold for this process)."""
    text = "[\n" + ",\n".join(json.dumps(line) for line in _verdicts.values()) + "\n]\n"
    try:
        atomic_write(cache_file(), lambda f: f.write(text.encode()))
    except OSError:
        pass


def measure(fast: Callable[[], None], plain: Callable[[], None]) -> tuple[float, float]:
    """Seconds of a call of `fast` and of `plain`, the least of REPEATS: each called once untimed
    (first-call costs), then in turns, the order alternated so that a drift on the machine hits
    both. The least, not the median: other processes only ever add time (on a 2-core machine
    shared with a test suite, single calls took 1x to 4x their quiet time)."""
    fast(), plain()
    times: dict[Callable, list[float]] = {fast: [], plain: []}
    for i in range(REPEATS):
        for way in (fast, plain) if i % 2 == 0 else (plain, fast):
            start = time.perf_counter()
            way()
            times[way].append(time.perf_counter() - start)
    return min(times[fast]), min(times[plain])


Ways = Callable[[], tuple[Callable[[], None], Callable[[], None]]]


def faster(path: str, case: str, ways: Ways) -> bool:
    """Whether `path`'s way beats the plain one at `case` (dtype, mode and shape, in words) here:
    from this process's or the cache's verdict, else timed now and cached. `ways()` makes the two
    (fast, plain) callables, only when they are to be timed; they run as eager autograd outside
    any autocast and must draw nothing from torch's global generator (dropout masks follow it)."""
    if not _loaded:
        _load()
    key = _key({**_machine(), "path": path, "case": case, "fast_ms": 0, "plain_ms": 0})
    if key not in _verdicts:
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast("cpu", enabled=False),
        ):
            fast_s, plain_s = measure(*ways())
            if fast_s < plain_s:
                # A win is measured again, and kept only if the fast way's worse figure beats the
                # plain way's better: the verdict holds for every later run, and once a noisy
                # moment of a shared 2-core VM made oneDNN's fp32 linear layers win by 8-14% at
                # DINOv2-B/14's shapes, which cost the whole model 13% (they were 3-13% slower)
                again = measure(*ways())
                fast_s, plain_s = max(fast_s, again[0]), min(plain_s, again[1])
        _verdicts[key] = {
            **dict(zip(FIELDS[:5], key, strict=True)),
            "fast_ms": round(fast_s * 1e3, 4),
            "plain_ms": round(plain_s * 1e3, 4),
        }
        _save()
    line = _verdicts[key]
    return line["fast_ms"] < line["plain_ms"]


def summary() -> str:
    """This machine's verdicts (this CPU, torch and thread count), one phrase each: which way won
    each case and by how much."""
    if not _loaded:
        _load()
    here = tuple(_machine().values())
    phrases = [
        f"{line['path']} {line['case']} "
        + (
            f"on, {line['plain_ms'] / max(line['fast_ms'], 1e-9):.2f}x faster"
            if line["fast_ms"] < line["plain_ms"]
            else f"off, {line['fast_ms'] / max(line['plain_ms'], 1e-9):.2f}x slower"
        )
        for key, line in _verdicts.items()
        if key[:3] == here
    ]
    return "; ".join(phrases) or "none measured yet"
