"""The `vitlab` command: one subcommand per job, every failure one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tomllib
import warnings
from pathlib import Path

from .config import CHOICES, VARIANTS, ModelConfig, TrainConfig, seed_name
from .errors import ConfigError as UsageError
from .errors import VitlabError, VitlabWarning, torch_error_message


# ---------------------------------------------------------------------------------------------
# vitlab models / vitlab download

def cmd_models(args: argparse.Namespace) -> int:
    import torch

    from .model import count_parameters, create_model

    rows = [("name", "seed name", "patch", "width", "depth", "heads", "MLP", "params (10 classes, 224 px)")]
    for name, config in VARIANTS.items():
        with torch.device("meta"):  # counts without allocating weights
            params = count_parameters(create_model(name, num_classes=10, img_size=224))
        rows.append((name, seed_name(name) if seed_name(name) != name else "", str(config.patch_size), str(config.hidden_size),
                     str(config.depth), str(config.num_heads), str(config.mlp_dim), f"{params:,}"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .checkpoints import OFFICIAL_CHECKPOINTS, cache_dir, fetch_official

    if args.list or not args.names:
        print(f"official checkpoints (cached in {cache_dir()}):")
        for name, entry in OFFICIAL_CHECKPOINTS.items():
            print(f"  {name:<20} {entry.variant:<9} {entry.num_classes:>6} classes  {entry.img_size} px  {entry.description}")
        return 0
    for name in args.names:
        if name not in OFFICIAL_CHECKPOINTS:
            raise UsageError(f"unknown checkpoint {name!r}; `vitlab download --list` shows the names")
    for name in args.names:
        print(fetch_official(name))
    return 0


# ---------------------------------------------------------------------------------------------
# vitlab train: every TrainConfig field is a flag (seed spelling and dashed), defaults from the config.

_TRAIN_HELP = {
    "name": "name of the run (required): output/<name>/ and logs/<name>/",
    "pretrained_dir": "initial weights: an .npz/.pt/.safetensors file, an official checkpoint name, 'none' (from scratch) "
    "or 'auto' (checkpoint/<model_type>.npz if present, else the official ImageNet-21k file)",
    "resume": "continue a run: a checkpoint path, or with no value the run's own output/<name>/last.pt",
    "fp16": "fp16 mixed precision (the same as --precision fp16; CUDA only)",
    "fp16_opt_level": "Apex opt level, mapped onto torch.amp: O0 fp32; O1 and O2 fp16 autocast with fp32 master weights",
    "local_rank": "process's GPU under torch.distributed.launch (torchrun sets LOCAL_RANK instead)",
}


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    from .recipes import RECIPES

    parser.add_argument("--recipe", choices=sorted(RECIPES), help="start from a named recipe (see vitlab/recipes.py)")
    parser.add_argument("--config", help="a JSON or TOML file of settings; flags override it")
    defaults, model_defaults = TrainConfig(), ModelConfig()
    for f in dataclasses.fields(TrainConfig):
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        default = getattr(defaults, f.name)
        help_text = _TRAIN_HELP.get(f.name, f.name.replace("_", " ")) + (f" (default: {default})" if f.name != "name" else "")
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if f.name == "fp16" or f.name == "compile":
            parser.add_argument(*flags, action="store_true", **kwargs)
        elif f.name == "hflip":
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        elif f.name == "resume":
            parser.add_argument(*flags, nargs="?", const="last", metavar="PATH", **kwargs)
        elif f.name == "adam_betas":
            parser.add_argument(*flags, type=float, nargs=2, metavar=("BETA1", "BETA2"), **kwargs)
        else:
            # A model override defaults to None: its type is that of the ModelConfig field it overrides.
            typed = getattr(model_defaults, f.name) if f.name in TrainConfig.MODEL_OVERRIDES else default
            kind = {int: int, float: float}.get(type(typed), str)
            parser.add_argument(*flags, type=kind, choices=CHOICES.get(f.name), **kwargs)


def _read_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        text = file.read_text()
        values = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: not valid {'TOML' if file.suffix == '.toml' else 'JSON'} ({e})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a table of settings")
    return values


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Recipe < config file < flags, into one TrainConfig."""
    from .recipes import RECIPES

    given = {k: v for k, v in vars(args).items() if k not in ("command", "func", "recipe", "config", "debug")}
    values = dict(RECIPES[args.recipe]) if getattr(args, "recipe", None) else {}
    if getattr(args, "config", None):
        values.update(_read_config_file(args.config))
    values.update(given)
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    config = train_config_from_args(args)
    config.validate()  # again with the real world size inside train(); this catches bad flags before any set-up
    train(config)
    return 0


# ---------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """Bad flags get one line, not the whole usage (`--help` still shows it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vitlab", description="Vision Transformers: models, official checkpoints, training.")
    parser.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors, and the fast paths in use "
                        "(also VITLAB_DEBUG=1)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("models", help="list the model variants with their shapes and parameter counts")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("download", help="fetch official checkpoints into the cache")
    p.add_argument("names", nargs="*", help="checkpoint names (see --list)")
    p.add_argument("--list", action="store_true", help="list the official checkpoints")
    p.set_defaults(func=cmd_download)
    p = sub.add_parser("train", help="fine-tune or train from scratch (the seed's train.py flags)")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)
    from .inference_cli import add_commands  # here, not at the top: that module imports UsageError from this one

    add_commands(sub)  # eval, predict, attention, export
    for command in sub.choices.values():  # --debug before or after the command
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    """vitlab's own warnings as one line on stderr; other libraries' keep Python's format."""
    if issubclass(category, VitlabWarning):
        print(f"vitlab: warning: {message}", file=file or sys.stderr)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    from . import keep_freed_memory

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"vitlab {args.command}: error: unrecognized arguments: {' '.join(unknown)} (see --help)", file=sys.stderr)
        return 2
    debug = args.debug or os.environ.get("VITLAB_DEBUG", "") not in ("", "0")
    warnings.showwarning = _one_line_warnings
    keep_freed_memory()  # a training step reuses the last one's memory instead of mapping it anew
    if debug:
        from .fastpaths import describe

        print(describe(), file=sys.stderr)
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into `head`: stop quietly, as the Python docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"vitlab {args.command}: interrupted", file=sys.stderr)
        return 130
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
