"""`vitlab demo --write-space`: the demo page written as a folder that deploys as a Hugging Face
Space: app.py (which serves the page of `demo.py`), requirements.txt, README.md with the Spaces
header, the model as model.safetensors, examples/ and a copy of vitlab.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from ..errors import ConfigError, VitlabError
from ..formats.checkpoints import load_model
from ..formats.weights import save_safetensors
from ..model import VisionTransformer
from .demo import find_examples, import_gradio, short_name

APP = '''"""A vitlab demo of {source}, written by `vitlab demo --write-space`: an image in, its top classes and the
model's attention out. Run here with `python app.py`; on Hugging Face Spaces it runs as it is. vitlab/ beside it is
the vitlab that wrote it, model.safetensors the model with its class names."""

from pathlib import Path

from vitlab.app.demo import serve

here = Path(__file__).parent
serve(here / "model.safetensors", examples={examples}, top_k={top_k}, device={device!r}, precision={precision!r},
      title={title!r})
'''

SPACE_README = """---
title: vitlab demo
emoji: 🔍
colorFrom: blue
colorTo: gray
sdk: gradio
sdk_version: {gradio_version}
python_version: "{python_version}"
app_file: app.py
pinned: false
---

# vitlab demo: {source}

A Vision Transformer ({variant}, {classes} classes, {img_size} px) to try: upload an image, see its top {top_k} classes
and where the model looked (attention rollout, or one layer's attention). Written by `vitlab demo --write-space`.
Run it locally with `pip install -r requirements.txt gradio=={gradio_version}`, then `python app.py`.
"""


def write_space(
    folder: str | os.PathLike,
    source: str | os.PathLike,
    model_type: str | None = None,
    *,
    examples: str | os.PathLike | None = None,
    top_k: int = 5,
    device: str = "auto",
    precision: str = "auto",
) -> None:
    """The Space in `folder`, which must be empty or new; any source becomes vitlab's own
    model.safetensors. `top_k`, `device` and `precision` are the page's, written into app.py."""
    gr = import_gradio()
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"--write-space {folder}: exists and is not an empty folder")
    model, class_names = load_model(source, model_type)
    requirements = vitlab_requirements()
    count = copy_examples(examples, source, folder)
    save_safetensors(model, folder / "model.safetensors", class_names)
    # This vitlab, the package the page runs on, so that the Space needs no release of it.
    package = Path(__file__).parents[1]
    shutil.copytree(package, folder / "vitlab", ignore=shutil.ignore_patterns("__pycache__"))
    app = APP.format(
        source=short_name(source),
        examples='here / "examples"' if count else None,
        top_k=top_k,
        device=device,
        precision=precision,
        title=short_name(source),
    )
    (folder / "app.py").write_text(app)
    (folder / "requirements.txt").write_text("".join(f"{r}\n" for r in requirements))
    readme = space_readme(model, class_names, source=source, top_k=top_k, gradio=gr.__version__)
    (folder / "README.md").write_text(readme)
    print(
        f"vitlab demo: wrote the Space {folder} (app.py, requirements.txt, README.md, "
        f"model.safetensors, {count} examples, vitlab/)"
    )


def copy_examples(
    examples: str | os.PathLike | None, source: str | os.PathLike, folder: Path
) -> int:
    """The demo's examples (`find_examples`) copied into `folder`/examples, numbered in their
    order; `folder` is made only once they are found. Returns how many."""
    with tempfile.TemporaryDirectory(prefix="vitlab-demo-") as scratch:
        found = find_examples(examples, source, Path(scratch))
        folder.mkdir(parents=True, exist_ok=True)
        if found:
            (folder / "examples").mkdir()
        for i, path in enumerate(map(Path, found)):
            shutil.copyfile(path, folder / "examples" / f"{i:02d}_{path.name}")
    return len(found)


def space_readme(
    model: VisionTransformer,
    class_names: list[str],
    *,
    source: str | os.PathLike,
    top_k: int,
    gradio: str,
) -> str:
    """README.md: the Spaces header (this Gradio and Python, app.py) and what the page shows."""
    return SPACE_README.format(
        gradio_version=gradio,
        python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
        source=short_name(source),
        variant=model.config.name,
        classes=len(class_names),
        img_size=model.config.img_size,
        top_k=top_k,
    )


def vitlab_requirements() -> list[str]:
    """vitlab's own dependencies, as installed (a Space gets Gradio itself from its README's
    sdk_version)."""
    try:
        requires = metadata.requires("vitlab") or []
    except metadata.PackageNotFoundError:
        raise VitlabError(
            "--write-space reads vitlab's dependencies from its installation: pip install -e ."
        ) from None
    return [r for r in requires if "extra ==" not in r]
