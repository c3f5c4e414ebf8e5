"""Devices, precisions and errors: one resolver for every command, `auto` precision, one-line errors for what the
user can fix (torch's included), tracebacks for bugs and under --debug."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vitlab import runtime
from vitlab.app import commands
from vitlab.app.cli import main
from vitlab.errors import ConfigError, VitlabError, VitlabWarning, torch_error_message
from vitlab.runtime import resolve_device, resolve_precision


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    assert resolve_device("auto") == expected
    for bad in ("tpu", "gpu", "cuda:x"):
        with pytest.raises(ConfigError, match=f"--device {bad!r}: choose auto"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_refused(name):
    with pytest.raises(ConfigError, match=f"--device {name}: CUDA is not available"):
        resolve_device(name)


def test_auto_precision_is_bf16_only_where_it_is_native(monkeypatch):
    cpu = torch.device("cpu")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(runtime, "native_bf16", lambda device: native)  # noqa: B023  called in this iteration
        assert resolve_precision("auto", cpu) == expected
    assert resolve_precision("fp32", cpu) == "fp32"


def test_bf16_where_it_is_emulated_runs_with_a_warning(monkeypatch):
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    with pytest.warns(
        VitlabWarning, match=r"bf16 is emulated on this CPU \(\w+\), many times slower than fp32"
    ):
        assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_fp16_needs_cuda_and_unknown_precisions_are_refused():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="--precision 'fp8': choose auto, fp32, bf16, fp16"):
        resolve_precision("fp8", torch.device("cpu"))


@pytest.mark.parametrize(
    "error, expected",
    [
        (MemoryError(), "out of memory"),
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
            "out of memory",
        ),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to allocate 1 bytes."
            ),
            "out of memory",
        ),
        (
            RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'"),
            "torch has no Half kernel for addmm_impl_cpu_ on this device",
        ),
        (
            RuntimeError(
                "could not create a primitive descriptor for the inner product forward propagation primitive"
            ),
            "oneDNN cannot",
        ),
        (RuntimeError("shape '[2, 3]' is invalid for input of size 7"), None),
        (KeyError("model"), None),
    ],
)
def test_torch_errors_the_user_caused_become_one_line_and_others_stay_bugs(error, expected):
    message = torch_error_message(error)
    if expected is None:
        assert message is None
    else:
        assert expected in message and "\n" not in message


def failing_models(error: BaseException):
    def command(args):
        raise error

    return command


def run_models(monkeypatch, capsys, error, *argv):
    monkeypatch.setattr(commands, "cmd_models", failing_models(error))
    capsys.readouterr()
    return main([*argv, "models"] if argv and argv[0] == "--debug" else ["models", *argv])


def test_a_user_error_is_one_line_and_its_exit_code(monkeypatch, capsys):
    assert run_models(monkeypatch, capsys, VitlabError("output/x: no such run")) == 1
    assert capsys.readouterr().err == "vitlab models: error: output/x: no such run\n"
    assert run_models(monkeypatch, capsys, ConfigError("--eval_every must be positive")) == 2


def test_an_error_inside_torch_is_one_line(monkeypatch, capsys):
    assert run_models(monkeypatch, capsys, torch.OutOfMemoryError("CUDA out of memory.")) == 1
    err = capsys.readouterr().err
    assert err.startswith("vitlab models: error: out of memory") and err.count("\n") == 1


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    with pytest.raises(KeyError):
        run_models(monkeypatch, capsys, KeyError("model"))


@pytest.mark.parametrize("how", ["flag before", "flag after", "environment"])
def test_debug_shows_the_traceback_and_the_fast_paths(how, monkeypatch, capsys):
    argv = {"flag before": ("--debug",), "flag after": ("--debug",), "environment": ()}[how]
    if how == "environment":
        monkeypatch.setenv("VITLAB_DEBUG", "1")
    monkeypatch.setattr(
        commands, "cmd_models", failing_models(VitlabError("output/x: no such run"))
    )
    capsys.readouterr()
    with pytest.raises(VitlabError):
        main([*argv, "models"] if how == "flag before" else ["models", *argv])
    assert capsys.readouterr().err.startswith("fast paths: ")


def test_vitlab_warnings_are_one_line(monkeypatch, capsys):
    def warn(args):
        warnings.warn("bf16 is emulated on this CPU (AVX2)", VitlabWarning, stacklevel=2)
        return 0

    monkeypatch.setattr(commands, "cmd_models", warn)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["models"]) == 0
    assert capsys.readouterr().err == "vitlab: warning: bf16 is emulated on this CPU (AVX2)\n"


# ---------------------------------------------------------------------------------------------
# Memory: how many images of a training batch fit at once


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


MEMINFO = "MemTotal:       24000000 kB\nMemFree:        20000000 kB\nMemAvailable:   23000000 kB\n"


@pytest.mark.parametrize(
    "files, expected",
    [
        ({}, (23_000_000 * 1024, "available")),
        (  # cgroup v2, a limit below what the machine has available
            {"memory.max": "8000000000\n", "memory.current": "3000000000\n"},
            (5_000_000_000, "left under the cgroup's limit"),
        ),
        (
            {"memory.max": "max\n", "memory.current": "3000000000\n"},
            (23_000_000 * 1024, "available"),
        ),
        (  # cgroup v1: no limit is a number near 2**63
            {
                "memory/memory.limit_in_bytes": "9223372036854771712\n",
                "memory/memory.usage_in_bytes": "1000\n",
            },
            (23_000_000 * 1024, "available"),
        ),
        (
            {
                "memory/memory.limit_in_bytes": "4000000000\n",
                "memory/memory.usage_in_bytes": "5000000000\n",
            },
            (0, "left under the cgroup's limit"),
        ),
    ],
)
def test_a_cpus_free_memory_is_memavailable_or_the_cgroups_headroom(tmp_path, files, expected):
    meminfo = write(tmp_path / "meminfo", MEMINFO)
    for name, text in files.items():
        write(tmp_path / "cgroup" / name, text)
    memory = runtime.available_memory(
        torch.device("cpu"), meminfo=str(meminfo), cgroup=str(tmp_path / "cgroup")
    )
    assert (memory.available, memory.source) == expected
    assert memory.share == runtime.CPU_SHARE


def test_a_system_that_does_not_say_gives_no_figure_and_processes_share_a_machine(
    tmp_path, monkeypatch
):
    cpu = torch.device("cpu")
    assert (
        runtime.available_memory(cpu, meminfo=str(tmp_path / "none"), cgroup=str(tmp_path)) is None
    )
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's processes on this machine
    memory = runtime.available_memory(cpu, meminfo=str(write(tmp_path / "meminfo", MEMINFO)))
    assert memory.share == runtime.CPU_SHARE / 4
    assert memory.usable == memory.available * runtime.CPU_SHARE / 4


STEP = runtime.StepMemory(fixed=1000, per_image=100)


def memory_for(images: float) -> runtime.Memory:
    """Memory whose usable share holds STEP with `images` images a micro-batch."""
    return runtime.Memory(
        available=2 * (STEP.fixed + images * STEP.per_image), source="free", share=0.5
    )


@pytest.mark.parametrize(
    "batch, at_least, fits, previous, steps, why",
    [
        (16, 1, 16, None, 1, "batch 16 in one pass (it fits; a step needs about"),
        (
            16,
            4,
            100,
            None,
            4,
            "4 micro-batches of 4 images, accumulated (--gradient_accumulation_steps 4; it fits",
        ),
        # 512 at 40 a micro-batch: 32, a power of two, so 16 micro-batches
        (
            512,
            1,
            40,
            None,
            16,
            "batch 512: 16 micro-batches of 32 images, accumulated (the whole batch would not",
        ),
        (512, 32, 40, None, 32, "32 micro-batches of 16 images"),  # never fewer than asked
        (100, 1, 40, None, 4, "4 micro-batches of 25 images"),  # 32 a micro-batch at most: 4 of 25
        (10, 1, 4.5, None, 3, "3 micro-batches of at most 4 images"),  # 4, 3, 3
        (512, 1, 100, 8, 8, "8 micro-batches of 64 images, accumulated (as the run resumed had it"),
        (
            512,
            1,
            40,
            8,
            16,
            "16 micro-batches of 32",
        ),  # the resumed run's 64 a micro-batch no longer fit
        (512, 16, 100, 8, 16, "16 micro-batches of 32"),  # nor fewer than now asked
        (
            8,
            1,
            0.5,
            None,
            8,
            "8 micro-batches of 1 image, accumulated (the whole batch would not fit; a step",
        ),
    ],
)
def test_the_fewest_micro_batches_that_fit(batch, at_least, fits, previous, steps, why):
    chosen, line = runtime.choose_accumulation(
        batch, at_least=at_least, step=STEP, memory=memory_for(fits), previous=previous
    )
    assert chosen == steps
    assert why in line
    assert line.endswith("; even one image may not fit") == (fits < 1)
    micro = -(-batch // steps)
    needs = (STEP.fixed + micro * STEP.per_image) / 1e9
    assert (
        f"a step needs about {needs:.1f} GB of the {memory_for(fits).usable / 1e9:.1f} GB usable, 50% of the"
        in line
    )


def test_without_a_memory_figure_the_batch_is_split_as_asked():
    assert runtime.choose_accumulation(64, at_least=2, step=STEP, memory=None) == (
        2,
        "--gradient_accumulation_steps 2: this system does not say how much memory is free",
    )


class Perceptron(nn.Sequential):
    """Images flattened, then two linear layers with a GELU between: autograd keeps the first layer's input, the
    GELU's input and the second layer's input (and, under bf16 autocast, the second layer's weight copy, which its
    input gradient needs; the first computes no input gradient)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__(
            nn.Flatten(), nn.Linear(48, 32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, 10)
        )
        self.config = SimpleNamespace(img_size=4, depth=1)
        self.grad_checkpointing = False


@pytest.mark.parametrize(
    "precision, per_image, weights",
    [("fp32", (48 + 32 + 32) * 4, 0), ("bf16", (48 + 32 + 32) * 2, 32 * 10 * 2)],
)
def test_a_steps_memory_is_what_autograd_keeps_counted_as_it_runs(precision, per_image, weights):
    model, cpu = Perceptron(), torch.device("cpu")
    saved = [runtime._saved_bytes(model, n, precision=precision, device=cpu) for n in (1, 2, 3)]
    assert saved == [weights + n * per_image for n in (1, 2, 3)]
    step = runtime.step_memory(model, batch_size=8, precision=precision, device=cpu)
    # And a block's activations and their gradients in its backward (depth 1: the whole network again, twice),
    # with the slack of a CPU's heap
    assert step.per_image == math.ceil(3 * per_image * runtime.CPU_HEAP_SLACK)
    trained = sum(p.numel() for p in model.parameters()) * 4
    images = 3 * 8 * 3 * 4 * 4 * 4
    assert step.fixed == math.ceil((3 * trained + weights + images) * runtime.CPU_HEAP_SLACK)


def test_measuring_a_step_leaves_the_random_state_and_the_mode_as_they_were():
    model = Perceptron(dropout=0.5).eval()
    state = torch.get_rng_state()
    trained = runtime._saved_bytes(model, 2, precision="fp32", device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)
    assert not model.training
    # Measured as it trains: the dropout's mask counted too
    assert trained > 2 * (48 + 32 + 32) * 4


def test_a_vits_step_is_measured_in_the_precision_and_with_the_checkpointing_it_trains_with(
    randomise,
):
    import vitlab

    model, cpu = (
        vitlab.create_model("Ti/16", num_classes=10, img_size=32, depth=2),
        torch.device("cpu"),
    )
    per_image = {}
    for precision, checkpointing in (("fp32", False), ("bf16", False), ("fp32", True)):
        model.grad_checkpointing = checkpointing
        step = runtime.step_memory(model, batch_size=4, precision=precision, device=cpu)
        per_image[precision, checkpointing] = step.per_image
    assert model.grad_checkpointing  # restored
    # The MLP's hidden activations alone: depth x tokens x mlp_dim floats an image
    assert per_image["fp32", False] > 2 * (4 + 1) * 768 * 4
    assert per_image["bf16", False] < per_image["fp32", False]
    assert per_image["fp32", True] < per_image["fp32", False]
