"""`vitlab demo`: a web page (Gradio) to try a model: an image in, its top classes and where the
model looked out.

One forward pass per image gives the prediction and every layer's attention; the maps are computed
then and kept in the page's session, so the map and opacity controls redraw the overlay without
running the model again. Offline and private by default: the server binds 127.0.0.1, makes no share
link unless asked, sends no analytics, and the page loads nothing from the internet (system fonts;
Gradio's scripts come from this server). `space.py` writes the same page as a Hugging Face Space.
"""

from __future__ import annotations

import html
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import preprocessing
from ..data import cifar_on_disk, held_out_folder, load_cifar, read_image
from ..errors import ConfigError, DataError, VitlabError
from ..formats.checkpoints import load_model, read_checkpoint
from ..model import VisionTransformer, count_parameters
from .inference import list_images, predict_with_attention, preprocess, seen_part, top_classes
from .rollout import attention_map, overlay

INSTALL = "pip install 'vitlab[demo]'"
# An upload above 40 megapixels is refused before it is decoded (120 MB as RGB).
MAX_PIXELS = 40_000_000
MAX_UPLOAD = "50mb"  # the browser refuses larger files before sending them
# Overlays are drawn on the image shrunk to this longest side, so that a redraw takes milliseconds.
DISPLAY_SIDE = 512
MAX_EXAMPLES = 8
IMAGE_HEIGHT = 320  # pixels on the page, whatever the image's own size
ROLLOUT = "rollout"
# Nothing to download, unlike a web font.
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
SYSTEM_MONO_FONTS = ("ui-monospace", "Consolas", "monospace")


def import_gradio():
    """Gradio, with its analytics off before it loads; without it, a one-line VitlabError that says
    how to install it."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError:
        raise VitlabError(f"the demo needs Gradio: {INSTALL}") from None
    return gradio


# ---------------------------------------------------------------------------------------------
# The model, run once per image


@dataclass
class Explained:
    """One image's forward pass: what the page shows and every map the controls can choose."""

    # uint8 (H, W, 3), at most DISPLAY_SIDE on its longest side: what the overlay is drawn on
    image: np.ndarray
    maps: dict[str, torch.Tensor]  # "rollout", "layer 1", ...: (grid, grid) relevance of each patch
    top: list[tuple[str, int, float]]  # (class name, index, probability), most probable first
    seconds: float  # the forward pass and the maps


class Demo:
    """A model ready to explain images on a device, in a precision, and the line that describes
    it."""

    def __init__(
        self,
        model: VisionTransformer,
        class_names: list[str],
        device: torch.device,
        *,
        precision: str,
        top_k: int,
    ):
        self.model, self.class_names = model.to(device), class_names
        self.device, self.precision, self.top_k = device, precision, top_k
        self.map_names = [ROLLOUT] + [f"layer {i}" for i in range(1, model.config.depth + 1)]
        size = model.config.img_size
        # The first call's set-up, not timed.
        predict_with_attention(
            self.model, torch.zeros(1, 3, size, size), device=device, precision=precision
        )

    def explain(self, image: np.ndarray) -> Explained:
        """The top classes and every attention map of one uint8 RGB image, from one forward pass."""
        start = time.perf_counter()
        images = preprocess(image, self.model.config)[None]
        logits, attentions = predict_with_attention(
            self.model, images, device=self.device, precision=self.precision
        )
        tokens = (self.model.config.num_prefix_tokens, self.model.config.has_class_token)
        maps = {ROLLOUT: attention_map(attentions, *tokens)[0].cpu()}
        maps |= {
            f"layer {i + 1}": attention_map(attentions, *tokens, i)[0].cpu()
            for i in range(len(attentions))
        }
        top = top_classes(logits, self.class_names, self.top_k)[0]
        # Drawn over the part of the image the model saw
        shown = shrink(seen_part(image, self.model.config), DISPLAY_SIDE)
        return Explained(shown, maps, top, time.perf_counter() - start)

    def describe(self, seconds: float | None = None) -> str:
        c = self.model.config
        line = (
            f"**{c.name}** (patch {c.patch_size}, depth {c.depth}, width {c.hidden_size}) · "
            f"{len(self.class_names)} classes · {c.img_size} px · "
            f"{count_parameters(self.model):,} parameters · {self.device.type} · {self.precision}"
        )
        return line + ("" if seconds is None else f" · last prediction {seconds * 1000:.0f} ms")


def shrink(image: np.ndarray, side: int) -> np.ndarray:
    """The image scaled down (never up) to at most `side` pixels on its longest side."""
    from PIL import Image

    thumbnail = Image.fromarray(image)
    # Bilinear in one pass: reducing_gap's box-filtered first step would change the pixels.
    thumbnail.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(thumbnail)


def render(explained: Explained, map_name: str, opacity: float) -> np.ndarray:
    """The overlay of one cached map: no model involved."""
    if map_name not in explained.maps:
        raise DataError(f"map {map_name!r}: choose {', '.join(explained.maps)}")
    if not 0 <= opacity <= 1:
        raise DataError(f"opacity {opacity}: choose a value from 0 to 1")
    return overlay(explained.image, explained.maps[map_name], opacity)


def read_upload(upload: dict, size: int | None = None) -> np.ndarray:
    """An uploaded file (Gradio's file data) as uint8 RGB, grey, palette and alpha converted, a
    large photo decoded smaller as `predict` decodes it for a model of `size` px; a file that is no
    image, or too large an image, is a DataError that names the file as the user did, not by its
    place on the server."""
    path, name = upload.get("path"), upload.get("orig_name") or "the upload"
    if not path:
        raise DataError(f"{name}: no file came with this upload")
    try:
        return read_image(path, size, max_pixels=MAX_PIXELS)
    except DataError as e:
        raise DataError(str(e).replace(path, name)) from None


# ---------------------------------------------------------------------------------------------
# The page


def build_page(demo: Demo, title: str, examples: list[str]):
    """The Blocks page: the image and its overlay side by side, the map and opacity controls, the
    top classes."""
    gr = import_gradio()
    with gr.Blocks(title=f"vitlab · {title}", analytics_enabled=False) as page:
        gr.Markdown(f"## vitlab · {html.escape(title)}")
        info = gr.Markdown(demo.describe(), elem_id="model-info")
        gr.Markdown(preprocessing.describe(demo.model.config), elem_id="preprocessing")
        cached = gr.State(None)
        with gr.Row():
            with gr.Column():
                image = uploads_only(
                    gr,
                    gr.Image(
                        label="image",
                        sources=["upload", "webcam", "clipboard"],
                        height=IMAGE_HEIGHT,
                        elem_id="image",
                    ),
                )
                if examples:
                    gr.Examples(examples, inputs=image, label="examples", cache_examples=False)
            with gr.Column():
                shown = gr.Image(
                    label="attention",
                    format="png",
                    interactive=False,
                    height=IMAGE_HEIGHT,
                    buttons=["download", "fullscreen"],
                    elem_id="overlay",
                )
                with gr.Row():
                    choice = gr.Radio(demo.map_names, value=ROLLOUT, label="map", elem_id="map")
                    opacity = gr.Slider(
                        0, 1, value=0.5, step=0.05, label="opacity", elem_id="opacity"
                    )
            label = gr.Label(num_top_classes=demo.top_k, label="top classes", elem_id="label")
        _connect(gr, demo, inputs=(image, choice, opacity), outputs=(label, shown, info, cached))
    return page


def uploads_only(gr, image):
    """`image` made to refuse a URL given as its value. Gradio's API takes an http(s) URL for an
    image and fetches it on the server before the page's function sees it; this page's images come
    from uploads, the webcam and the clipboard only, so that it fetches nothing from the
    internet."""
    fetch, fetch_async = (
        image.move_resource_to_block_cache,
        image.async_move_resource_to_block_cache,
    )

    def refuse_urls(value) -> None:
        if str(value).lower().startswith(("http://", "https://")):
            raise gr.Error(
                "images come from uploads only: this page fetches nothing from the internet",
                print_exception=False,
            )

    def guarded(value):
        refuse_urls(value)
        return fetch(value)

    async def guarded_async(value):
        refuse_urls(value)
        return await fetch_async(value)

    image.move_resource_to_block_cache, image.async_move_resource_to_block_cache = (
        guarded,
        guarded_async,
    )
    return image


def _connect(gr, demo: Demo, *, inputs: tuple, outputs: tuple) -> None:
    """The page's events: a new image runs the model once, the controls redraw from its cache."""
    image, choice, opacity = inputs
    label, shown, info, cached = outputs

    def on_image(upload: dict | None, map_name: str, opacity_value: float):
        if upload is None:
            return None, None, demo.describe(), None
        try:
            side = preprocessing.resized_side(demo.model.config)
            explained = demo.explain(read_upload(upload, side))
            overlaid = render(explained, map_name, opacity_value)
        except DataError as e:  # a message on the page, no traceback in the terminal
            raise gr.Error(html.escape(str(e), quote=False), print_exception=False) from None
        return (
            {name: p for name, _, p in explained.top},
            overlaid,
            demo.describe(explained.seconds),
            explained,
        )

    def on_control(explained: Explained | None, map_name: str, opacity_value: float):
        return None if explained is None else render(explained, map_name, opacity_value)

    # A new image first clears the last one's results, so that a refused upload leaves none
    # standing.
    image.change(
        lambda: (None, None, None),
        outputs=[label, shown, cached],
        api_visibility="private",
        show_progress="hidden",
    ).then(
        on_image,
        [image, choice, opacity],
        [label, shown, info, cached],
        api_name="predict",
        preprocess=False,
    )
    for control in (choice, opacity):
        control.change(
            on_control,
            [cached, choice, opacity],
            shown,
            api_visibility="private",
            show_progress="hidden",
            trigger_mode="always_last",
        )


def launch_options(gr, *, host: str | None, port: int | None, share: bool) -> dict:
    """Gradio's launch arguments: private (no share link unless asked, no monitoring page, no run
    history kept in the browser) and offline (system fonts). `host` and `port` None: Gradio's
    environment variables, else 127.0.0.1:7860."""
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO_FONTS)
    return {
        "server_name": host,
        "server_port": port,
        "share": share,
        "theme": theme,
        "max_file_size": MAX_UPLOAD,
        "footer_links": ["api"],
        "run_history": False,
        "enable_monitoring": False,
        "quiet": True,
    }


def short_name(source: str | os.PathLike) -> str:
    """An official name as it is; a file as its folder and name (a run's `<name>/best.pt`), no more
    of its path."""
    return "/".join(Path(str(source)).parts[-2:])


def serve(
    source: str | os.PathLike,
    model_type: str | None = None,
    examples: str | os.PathLike | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    share: bool = False,
    top_k: int = 5,
    device: str = "auto",
    precision: str = "auto",
    title: str | None = None,
) -> None:
    """Load the model, build the page and serve it until interrupted; `title` defaults to the
    source's last two parts."""
    from ..runtime import resolve_device, resolve_precision

    gr = import_gradio()
    resolved = resolve_device(device)
    model, class_names = load_model(source, model_type)
    precision = resolve_precision(precision, resolved)
    demo = Demo(model, class_names, resolved, precision=precision, top_k=top_k)
    with tempfile.TemporaryDirectory(prefix="vitlab-demo-") as scratch:
        page = build_page(
            demo, title or short_name(source), find_examples(examples, source, Path(scratch))
        )
        options = launch_options(gr, host=host, port=port, share=share)
        try:
            page.launch(prevent_thread_lock=True, **options)
        except OSError as e:
            # Gradio's message names its own launch() arguments; ours names the flags.
            raise VitlabError(
                f"cannot serve on {host or '127.0.0.1'}:{port or 7860} ({str(e).split('. ')[0]}); "
                "choose another --port, or --host"
            ) from None
        public = f", public link {page.share_url}" if page.share_url else ""
        print(f"vitlab demo: {source} at {page.local_url}{public} (Ctrl+C to stop)", flush=True)
        page.block_thread()


# ---------------------------------------------------------------------------------------------
# Examples


def find_examples(
    folder: str | os.PathLike | None, source: str | os.PathLike, scratch: Path
) -> list[str]:
    """Up to MAX_EXAMPLES images: from `folder`, else one per class of the dataset a vitlab run was
    trained on where it is on this machine (CIFAR's are written into `scratch`), else none. Says on
    stdout where they come from."""
    if folder is not None:
        files, problems = list_images([str(folder)])
        if problems:
            raise ConfigError(f"--examples {problems[0]}")
        found, where = [str(f) for f in files[:MAX_EXAMPLES]], str(folder)
    else:
        found, where = dataset_examples(source, scratch)
    print(
        f"vitlab demo: {len(found)} examples ({where})"
        if found
        else f"vitlab demo: no examples ({where}; --examples DIR)"
    )
    return found


def dataset_examples(source: str | os.PathLike, scratch: Path) -> tuple[list[str], str]:
    """(image files, where they come from): the first image of each class of a run's own dataset."""
    from PIL import Image

    path = Path(str(source))
    if path.suffix != ".pt" or not path.is_file():
        return [], "this checkpoint names no dataset"
    train_config = read_checkpoint(path).get("train_config") or {}
    dataset, data_dir = train_config.get("dataset"), Path(train_config.get("data_dir", "data"))
    if dataset == "imagefolder" and data_dir.is_dir():
        root = held_out_folder(data_dir) or data_dir
        firsts = [
            list_images([str(d)])[0][:1]
            for d in sorted(p for p in root.iterdir() if p.is_dir())[:MAX_EXAMPLES]
        ]
        return [str(f[0]) for f in firsts if f], f"the run's image folder {root}"
    if dataset in ("cifar10", "cifar100") and cifar_on_disk(dataset, data_dir):
        data = load_cifar(dataset, data_dir, train=False)
        files = []
        for label in range(min(MAX_EXAMPLES, len(data.class_names))):
            index = int(torch.nonzero(data.labels == label)[0])
            files.append(scratch / f"{label}_{data.class_names[label]}.png")
            Image.fromarray(data.images[index].numpy()).save(files[-1])
        return [str(f) for f in files], f"the run's {dataset} test split in {data_dir}"
    return [], f"the run's {dataset} is not at {data_dir}"
