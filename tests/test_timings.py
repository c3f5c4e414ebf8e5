"""The fast paths' timing verdicts: the choice follows the timings (faked here: no test asserts real speed), a verdict
is measured once and cached per CPU model, torch version and thread count, a corrupt or unwritable cache is ignored,
and the layers follow the verdicts."""

from __future__ import annotations

import json

import pytest
import torch

from vitlab import fastpaths, timings
from vitlab.fastpaths import Linear

from conftest import REAL_MEASURE


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache folder, a process that has measured and read nothing yet, and the real timing (conftest fixes
    the verdicts of every other test)."""
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(timings, "_verdicts", {})
    monkeypatch.setattr(timings, "_loaded", False)
    monkeypatch.setattr(timings, "measure", REAL_MEASURE)


def fake_timings(monkeypatch, fast_s: float, plain_s: float, *later: tuple) -> list[str]:
    """`measure` replaced by fixed figures (the first measurement's, then `later` ones', then the
    first again); returns the list each measurement's call is noted in."""
    calls = []

    def measure(fast, plain):
        calls.append("measured")
        return later[len(calls) - 2] if 2 <= len(calls) <= len(later) + 1 else (fast_s, plain_s)

    monkeypatch.setattr(timings, "measure", measure)
    return calls


def no_ways():
    raise AssertionError("the ways are made only to be timed")


@pytest.mark.parametrize("fast_s, plain_s, expected", [(1.0, 2.0, True), (2.0, 1.0, False)])
def test_the_choice_follows_the_timings(fast_s, plain_s, expected, monkeypatch):
    fake_timings(monkeypatch, fast_s, plain_s)
    assert timings.faster("path", "fp32 train 8x4", lambda: (None, None)) is expected
    word = "faster" if expected else "slower"
    assert f"path fp32 train 8x4 {'on' if expected else 'off'}, 2.00x {word}" in timings.summary()
    assert "path fp32 train 8x4" in fastpaths.describe("cpu")


def test_a_verdict_is_measured_once_then_read_from_the_cache(monkeypatch):
    calls = fake_timings(monkeypatch, 1.0, 2.0)
    assert timings.faster("path", "case", lambda: (None, None))
    assert timings.faster("path", "case", no_ways)  # this process's verdict
    monkeypatch.setattr(timings, "_verdicts", {})  # a new process: the file's
    monkeypatch.setattr(timings, "_loaded", False)
    assert timings.faster("path", "case", no_ways)
    assert calls == ["measured"] * 2  # a win measured again
    lines = timings.cache_file().read_text().splitlines()
    assert lines[0] == "[" and lines[-1] == "]" and len(lines) == 3  # one line a verdict
    line = json.loads(lines[1])
    assert line["fast_ms"] == 1000 and line["plain_ms"] == 2000 and line["case"] == "case"
    assert line["cpu"] == timings.cpu_name() and line["torch"] == torch.__version__


@pytest.mark.parametrize(
    "again, expected, figures",
    [((1.5, 1.8), True, (1500, 1800)), ((2.2, 2.0), False, (2200, 2000))],
)
def test_a_win_counts_only_if_measured_again(again, expected, figures, monkeypatch):
    # The fast way's worse figure against the plain way's better one
    calls = fake_timings(monkeypatch, 1.0, 2.0, again)
    assert timings.faster("path", "case", lambda: (None, None)) is expected
    line = json.loads(timings.cache_file().read_text().splitlines()[1])
    assert (line["fast_ms"], line["plain_ms"]) == figures and len(calls) == 2
    # A loss is not measured again
    calls = fake_timings(monkeypatch, 2.0, 1.0)
    assert not timings.faster("path", "another case", lambda: (None, None))
    assert calls == ["measured"]


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        '[{"cpu": "x"}]',
        '{"a": 1}',
        "\udcff".encode("utf-8", "surrogateescape"),
    ],
)
def test_a_corrupt_cache_is_ignored_and_rewritten(content, monkeypatch):
    calls = fake_timings(monkeypatch, 2.0, 1.0)
    path = timings.cache_file()
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert timings.faster("path", "case", lambda: (None, None)) is False
    assert calls == ["measured"]
    assert [line["case"] for line in json.loads(path.read_text())] == ["case"]


@pytest.mark.parametrize("change", ["cpu", "torch", "threads"])
def test_another_cpu_torch_or_thread_count_measures_anew(change, monkeypatch):
    calls = fake_timings(monkeypatch, 1.0, 2.0)
    timings.faster("path", "case", lambda: (None, None))
    if change == "cpu":
        monkeypatch.setattr(timings, "cpu_name", lambda: "Another CPU")
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    else:
        monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    fake_timings(monkeypatch, 2.0, 1.0).extend(calls)
    assert timings.faster("path", "case", lambda: (None, None)) is False
    lines = json.loads(timings.cache_file().read_text())
    assert len(lines) == 2  # both machines' verdicts kept
    assert "none measured yet" not in timings.summary() and "slower" in timings.summary()


def test_a_cache_that_cannot_be_written_still_gives_verdicts(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("VITLAB_CACHE", str(blocked))
    calls = fake_timings(monkeypatch, 1.0, 2.0)
    assert timings.faster("path", "case", lambda: (None, None))
    assert timings.faster("path", "case", no_ways) and calls == ["measured"] * 2
    assert blocked.read_text() == "not a folder"


def test_measure_alternates_the_ways_and_takes_the_least(monkeypatch):
    # A fake clock: each call of a way advances it by that way's cost, the first calls (untimed) by much more.
    clock, costs, order = [0.0], {"fast": [9, 3, 5, 4, 6, 7], "plain": [9, 8, 6, 9, 7, 8]}, []

    def way(name):
        def call():
            order.append(name)
            clock[0] += costs[name].pop(0)

        return call

    monkeypatch.setattr(timings.time, "perf_counter", lambda: clock[0])
    assert timings.measure(way("fast"), way("plain")) == (3, 6)
    assert order[:2] == ["fast", "plain"]  # the untimed calls
    assert order[2:6] == ["fast", "plain", "plain", "fast"]


def test_the_timing_draws_nothing_from_the_global_generator():
    # Dropout masks follow the generator: a verdict measured in the middle of a step must not move it.
    torch.manual_seed(3)
    state = torch.get_rng_state()
    fastpaths.onednn_linear_faster(torch.float32, True, (5, 8, 4))
    fastpaths.explicit_attention_faster(torch.bfloat16, True, torch.Size((2, 2, 5, 8)))
    assert torch.equal(torch.get_rng_state(), state)
    assert len(json.loads(timings.cache_file().read_text())) == 2


@pytest.mark.parametrize("oneDNN_faster", [True, False])
def test_the_linear_layer_follows_its_verdict(oneDNN_faster, monkeypatch):
    if not fastpaths.onednn_linear_usable(torch.float32):
        pytest.skip("oneDNN's linear layer does not run here")
    fake_timings(monkeypatch, 1.0 if oneDNN_faster else 3.0, 2.0)
    layer = Linear(16, 8)
    y = layer(torch.randn(4, 16, requires_grad=True))
    want = "_OneDnnLinearBackward" if oneDNN_faster else "AddmmBackward0"
    assert type(y.grad_fn).__name__ == want
    assert "oneDNN linear fp32 train 4x16->8" in timings.summary()


@pytest.mark.parametrize("explicit_faster", [True, False])
def test_bf16_attention_follows_its_verdict_and_fp32_takes_sdpa(explicit_faster, monkeypatch):
    calls = fake_timings(monkeypatch, 1.0 if explicit_faster else 3.0, 2.0)
    q = torch.zeros(2, 3, 5, 8)
    assert fastpaths.use_explicit_attention(q.bfloat16(), "auto") is explicit_faster
    assert fastpaths.use_explicit_attention(q, "auto") is False
    assert fastpaths.use_explicit_attention(q.bfloat16(), "sdpa") is False
    assert calls == ["measured"] * (
        2 if explicit_faster else 1
    )  # bf16 under "auto" only; a win twice
