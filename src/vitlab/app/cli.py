"""The `vitlab` command: its parser, and the one rule for failures.

A bad input is one line on stderr and a non-zero exit: 2 for a bad flag or setting (argparse's own
refusals included), 1 for anything else the user can fix (a missing or corrupt file, a dataset, a
run that cannot go on, torch out of memory), 130 when interrupted (Ctrl-C) and 143 on SIGTERM:
`train` then saves last.pt at the step boundary first. A bug in vitlab keeps its traceback, and
`--debug` (or VITLAB_DEBUG=1) shows every traceback and the fast paths in use. The commands
themselves are in `commands.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tomllib
import warnings
from pathlib import Path

from ..config import DATASETS, MODEL_OVERRIDES, ModelConfig, TrainConfig, field_type
from ..errors import ConfigError, VitlabError, VitlabWarning, torch_error_message
from ..formats import export
from ..runs import Stopped
from ..runtime import DEVICES_HELP, PRECISIONS, PRECISIONS_HELP
from . import commands, frozen

SOURCE_HELP = (
    "a run's checkpoint (.pt), a vitlab .safetensors file, an official checkpoint name or .npz "
    "file, a timm state dict (.safetensors, .bin, .pth), a transformers or timm folder, Meta's "
    "DINOv2 .pth, an OpenAI or OpenCLIP CLIP state dict, big_vision's SigLIP .npz, or "
    "hf-hub:ORG/NAME[@REVISION]"
)


# ---------------------------------------------------------------------------------------------
# vitlab train: every TrainConfig field and every overridable ModelConfig field is a flag, in the
# tutorial's spelling and dashed, with the field's help and choices; defaults stay unset here, so
# that recipe < config file < flags.


def _field_flag(
    parser: argparse.ArgumentParser, cls, f: dataclasses.Field, *, dest: str, default
) -> None:
    meta = f.metadata
    flags = (
        [f"--{f.name}"]
        + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        + list(meta.get("aliases", ()))
    )
    shown = (
        ""
        if f.name == "name"
        else f" (default: {'the variant' if dest.startswith('model.') else default})"
    )
    kwargs = dict(dest=dest, default=argparse.SUPPRESS, help=meta["help"] + shown)
    kind, args, _ = field_type(cls, f.name)
    if kind is bool:
        parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
    elif "nargs" in meta:
        item = float if float in args else str
        parser.add_argument(
            *flags,
            type=item,
            nargs=meta["nargs"],
            const=meta.get("const"),
            metavar=meta.get("metavar"),
            **kwargs,
        )
    else:
        parser.add_argument(
            *flags,
            type=kind if kind in (int, float) else str,
            choices=meta.get("choices"),
            metavar=None if meta.get("choices") else f.name.upper(),
            **kwargs,
        )


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    from ..recipes import RECIPES

    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="start from a named recipe (src/vitlab/recipes.py)",
    )
    parser.add_argument("--config", help="a JSON or TOML file of settings; flags override it")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name != "model":
            _field_flag(parser, TrainConfig, f, dest=f.name, default=getattr(defaults, f.name))
    for f in MODEL_OVERRIDES.values():
        _field_flag(parser, ModelConfig, f, dest=f"model.{f.name}", default=None)


def _read_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        text = file.read_text()
        values = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"--config {path}: not valid {'TOML' if file.suffix == '.toml' else 'JSON'} ({e})"
        ) from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a table of settings")
    return values


def _flat(values: dict) -> dict:
    """Settings with the model overrides at the top level, as flags give them (`patch_size`, not
    `model.patch_size`)."""
    values = dict(values)
    return {**values, **(values.pop("model", None) or {})}


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Recipe < config file < flags, into one TrainConfig."""
    from ..recipes import RECIPES

    flags = {
        k.removeprefix("model."): v
        for k, v in vars(args).items()
        if k not in ("command", "func", "recipe", "config", "debug")
    }
    values = _flat(RECIPES[args.recipe]) if getattr(args, "recipe", None) else {}
    if getattr(args, "config", None):
        values.update(_flat(_read_config_file(args.config)))
    try:
        return TrainConfig.from_dict({**values, **flags})
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Each command's flags (train's own are above)


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=SOURCE_HELP)
    p.add_argument(
        "--model_type",
        "--model-type",
        help="the variant of an official .npz file or a timm state dict (which do "
        "not say it), e.g. B/16, or of a CLIP state dict (its GELU: clip-B/16 or openclip-B/16; "
        "`vitlab models`)",
    )


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=f"{DEVICES_HELP} (default: auto)")
    p.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help=f"{PRECISIONS_HELP} (default: auto)"
    )


def _add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace {what} where there is one already (never the command's own input)",
    )


def _add_threshold(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--threshold", type=float, default=0.5, help=f"{what} (default: 0.5)")


def _add_models(sub) -> None:
    p = sub.add_parser(
        "models",
        help="list the model variants by family, with their shapes and parameter counts",
    )
    p.set_defaults(func=commands.cmd_models)


def _add_download(sub) -> None:
    p = sub.add_parser(
        "download", help="fetch official checkpoints or Hub repositories into their caches"
    )
    p.add_argument(
        "names",
        nargs="*",
        help="official checkpoint names, family variants (their timm repository) or "
        "hf-hub:ORG/NAME (see --list)",
    )
    p.add_argument(
        "--list", action="store_true", help="list the official checkpoints and the other sources"
    )
    p.set_defaults(func=commands.cmd_download)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune or train from scratch (the tutorial's train.py flags)"
    )
    _add_train_flags(p)
    p.set_defaults(func=lambda args: commands.cmd_train(train_config_from_args(args)))


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="accuracy, per-class accuracy and confusion matrix on a test set"
    )
    _add_source(p)
    p.add_argument(
        "--dataset", choices=DATASETS, default="cifar10", help="(default: cifar10, its test split)"
    )
    p.add_argument(
        "--data_dir",
        "--data-dir",
        default="data",
        help="CIFAR download folder, or the image folder's root "
        "(<root>/<class>/<image>; its val/ or test/ subfolder when present) (default: data)",
    )
    p.add_argument(
        "--labels",
        metavar="CSV",
        help="the test images and their labels from a CSV instead (path,label;label;... or a "
        "header of classes over 0/1 columns; paths relative to the CSV): a multi-label model's",
    )
    _add_threshold(p, "a multi-label model's F1 counts a class where its probability reaches it")
    p.add_argument(
        "--out",
        help="folder for the JSON and PNG (default: beside the checkpoint file, else ./eval)",
    )
    _add_overwrite(p, "the JSON and PNG")
    p.add_argument("--batch_size", "--batch-size", type=int, default=64, help="(default: 64)")
    p.add_argument(
        "--num_workers",
        "--num-workers",
        type=int,
        default=2,
        help="decoding workers for folders streamed from disk (default: 2)",
    )
    _add_runtime(p)
    p.set_defaults(func=commands.cmd_eval)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="the most probable classes of images")
    _add_source(p)
    p.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files, or folders searched recursively"
    )
    p.add_argument(
        "--top_k", "--top-k", type=int, default=5, help="classes shown per image (default: 5)"
    )
    _add_threshold(p, "a multi-label model lists every class whose probability reaches it")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--batch_size", "--batch-size", type=int, default=32, help="(default: 32)")
    _add_runtime(p)
    p.set_defaults(func=commands.cmd_predict)


def _add_attention(sub) -> None:
    p = sub.add_parser("attention", help="attention rollout over an image, drawn as a PNG")
    _add_source(p)
    p.add_argument("image", help="an image file")
    p.add_argument(
        "--out", help="the PNG to write (default: <image stem>_attention.png beside the image)"
    )
    _add_overwrite(p, "the PNG")
    p.add_argument(
        "--layer",
        type=int,
        help="show layer N's own attention (1 = first), heads averaged, instead of the rollout",
    )
    _add_runtime(p)
    p.set_defaults(func=commands.cmd_attention)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="a web page to try the model: top classes and attention (pip install 'vitlab[demo]')",
    )
    _add_source(p)
    p.add_argument(
        "--examples",
        metavar="DIR",
        help="example images (default: a few of the run's own dataset, where it is here)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to serve on; 0.0.0.0 opens it to your network "
        "(default: 127.0.0.1, this machine only)",
    )
    p.add_argument("--port", type=int, default=7860, help="(default: 7860)")
    p.add_argument(
        "--share",
        action="store_true",
        help="also a public link through Gradio's share servers (off by default)",
    )
    p.add_argument("--top_k", "--top-k", type=int, default=5, help="classes shown (default: 5)")
    p.add_argument(
        "--write_space",
        "--write-space",
        metavar="DIR",
        help="write the page as a Hugging Face Space into DIR "
        "(app.py, requirements.txt, README.md, the model) instead of serving it",
    )
    _add_runtime(p)
    p.set_defaults(func=commands.cmd_demo)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write the model as ONNX, TorchScript, safetensors, official .npz, a timm state "
        "dict or a transformers folder",
    )
    _add_source(p)
    p.add_argument("--format", required=True, choices=export.FORMATS)
    p.add_argument("--out", required=True, help="the file to write (for hf: the folder)")
    _add_overwrite(p, "--out")
    p.set_defaults(func=commands.cmd_export)


class _Parser(argparse.ArgumentParser):
    """Bad flags get one line, not the whole usage (`--help` still shows it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vitlab", description="Vision Transformers: models, official checkpoints, training."
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="full tracebacks instead of one-line errors, and the fast paths in use "
        "(also VITLAB_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In this order in --help.
    for add in (
        _add_models,
        _add_download,
        _add_train,
        _add_eval,
        _add_predict,
        _add_attention,
        _add_demo,
        _add_export,
    ):
        add(sub)
    frozen.add_parsers(
        sub, add_source=_add_source, add_runtime=_add_runtime, add_overwrite=_add_overwrite
    )
    for command in sub.choices.values():  # --debug before or after the command
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


# ---------------------------------------------------------------------------------------------

_show_warning = warnings.showwarning


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    """vitlab's own warnings as one line on stderr; other libraries' keep Python's format."""
    if issubclass(category, VitlabWarning):
        print(f"vitlab: warning: {message}", file=file or sys.stderr)
    else:
        _show_warning(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    from .. import keep_freed_memory

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(
            f"vitlab {args.command}: error: unrecognized arguments: {' '.join(unknown)} (see "
            "--help)",
            file=sys.stderr,
        )
        return 2
    debug = getattr(args, "debug", False) or os.environ.get("VITLAB_DEBUG", "") not in ("", "0")
    warnings.showwarning = _one_line_warnings
    keep_freed_memory()  # a training step reuses the last one's memory instead of mapping it anew
    if debug:
        from ..fastpaths import describe

        print(describe(), file=sys.stderr)
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into `head`: stop quietly, as the Python docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"vitlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except Stopped as e:  # a signal at a step boundary: the run's state saved, not an error
        print(f"vitlab {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        message = str(e) if isinstance(e, (VitlabError, OSError)) else torch_error_message(e)
        if debug or message is None:  # a bug in vitlab, or the user asked for the traceback
            raise
        print(f"vitlab {args.command}: error: {message}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    finally:
        warnings.showwarning = _show_warning


if __name__ == "__main__":
    sys.exit(main())
