"""Devices, precisions and errors: one resolver for every command, `auto` precision, one-line errors for what the
user can fix (torch's included), tracebacks for bugs and under --debug."""

from __future__ import annotations

import warnings

import pytest
import torch

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
