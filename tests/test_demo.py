"""`vitlab demo`: the forward pass run once per image, uploads, examples and the Space writer in-process; then the page
served by `vitlab demo` in a subprocess, through gradio_client and in headless Chromium, with the internet cut and
watched (the browser may reach 127.0.0.1 only; the server's outgoing requests go to a proxy that records them)."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.app import demo, space
from vitlab.app.cli import main
from vitlab.app.demo import Demo, find_examples, read_upload, render, shrink
from vitlab.app.inference import predict, preprocess
from vitlab.app.rollout import attention_map
from vitlab.data import ImageSet, read_image
from vitlab.errors import ConfigError, DataError, VitlabError
from vitlab.formats.checkpoints import load_model, read_checkpoint
from vitlab.model import count_parameters

from conftest import REPO, train_tiny
from parity import one_error_line

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
    """A tiny run of two layers, so that the rollout and each layer's map differ."""
    return train_tiny(tmp_path_factory.mktemp("demo_run"), depth=2)


def predicted(checkpoint, image, capsys) -> dict:
    """`vitlab predict --json`'s top classes of one image, in fp32 on the CPU like the served page."""
    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                str(checkpoint),
                str(image),
                "--json",
                "--precision",
                "fp32",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    return json.loads(capsys.readouterr().out)[0]["top_k"]


# ---------------------------------------------------------------------------------------------
# One forward pass per image, the maps cached


def test_one_forward_pass_gives_the_prediction_and_every_map(deep_run):
    model, names = load_model(deep_run.checkpoint)
    page = Demo(model, names, CPU, precision="fp32", top_k=2)
    calls = []
    forward = model.forward
    model.forward = lambda *args, **kwargs: calls.append(kwargs) or forward(*args, **kwargs)
    image = read_image(str(deep_run.data_dir / "dog" / "1.png"))
    explained = page.explain(image)
    overlays = {
        (name, opacity): render(explained, name, opacity)
        for name in page.map_names
        for opacity in (0.0, 0.5, 1.0)
    }
    assert calls == [{"return_attention": True}]  # the controls redraw from the cache
    assert list(explained.maps) == page.map_names == ["rollout", "layer 1", "layer 2"]
    images = preprocess(image, model.config)[None]
    _, attentions = forward(images, return_attention=True)
    for i, name in enumerate(page.map_names):
        torch.testing.assert_close(
            explained.maps[name], attention_map(attentions, 1, True, None if i == 0 else i - 1)[0]
        )
    expected = predict(model, images, names, top_k=2, device=CPU, precision="fp32")[0]
    assert [(c, i) for c, i, _ in explained.top] == [(c, i) for c, i, _ in expected]
    np.testing.assert_allclose([p for *_, p in explained.top], [p for *_, p in expected], atol=1e-5)
    assert np.array_equal(overlays["rollout", 0.0], image)  # opacity 0: the image alone
    assert not np.array_equal(overlays["rollout", 1.0], overlays["layer 1", 1.0])
    assert (
        f"{count_parameters(model):,} parameters · cpu · fp32" in page.describe()
        and "last prediction" not in page.describe()
    )
    assert page.describe(0.012).endswith(" · last prediction 12 ms")


def test_the_overlay_is_drawn_on_the_image_shrunk_never_enlarged():
    photo = np.random.default_rng(0).integers(0, 256, (900, 1200, 3), dtype=np.uint8)
    assert shrink(photo, 512).shape == (384, 512, 3)
    assert shrink(photo[:40, :30], 512).shape == (40, 30, 3)


def test_controls_outside_the_page_choices_are_refused(deep_run):
    model, names = load_model(deep_run.checkpoint)
    explained = Demo(model, names, CPU, precision="fp32", top_k=3).explain(
        read_image(str(deep_run.data_dir / "cat" / "0.png"))
    )
    with pytest.raises(DataError, match=r"map 'layer 3': choose rollout, layer 1, layer 2"):
        render(explained, "layer 3", 0.5)
    with pytest.raises(DataError, match="opacity 1.5: choose a value from 0 to 1"):
        render(explained, "rollout", 1.5)


# ---------------------------------------------------------------------------------------------
# Uploads


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16"])
def test_grey_palette_and_alpha_uploads_become_rgb(mode, tmp_path):
    path = tmp_path / "upload.png"
    rgb = np.random.default_rng(1).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert(mode).save(path)
    image = read_upload({"path": str(path), "orig_name": "mine.png"})
    assert image.dtype == np.uint8 and image.shape == (12, 20, 3)
    with Image.open(path) as original:
        assert np.array_equal(image, np.asarray(original.convert("RGB")))


def test_bad_uploads_are_one_line_naming_the_file_as_the_user_did(tmp_path, monkeypatch):
    text = tmp_path / "cached-by-gradio.png"
    text.write_text("hello, not an image\n")
    with pytest.raises(DataError) as refused:
        read_upload({"path": str(text), "orig_name": "notes.png"})
    assert str(refused.value).startswith("notes.png: not a readable image") and str(
        tmp_path
    ) not in str(refused.value)
    monkeypatch.setattr(demo, "MAX_PIXELS", 100)
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(DataError, match=r"^photo.png: 16 x 16 pixels, more than the 100 accepted"):
        read_upload({"path": str(tmp_path / "big.png"), "orig_name": "photo.png"})
    with pytest.raises(DataError, match="no file came with this upload"):
        read_upload({"path": None, "url": "data:image/png;base64,", "orig_name": "webcam.png"})


def test_the_page_fetches_no_url_given_as_its_image(deep_run, tmp_path, monkeypatch):
    # Gradio's API takes an http(s) URL as an image's value and downloads it on the server before the page's function
    # runs: the page's image refuses it there, and its downloads are never reached. An upload still goes through.
    import asyncio

    import gradio as gr
    from gradio import processing_utils

    fetched = []

    async def async_download(url, cache_dir):
        fetched.append(url)
        return str(tmp_path / "fetched.png")

    monkeypatch.setattr(processing_utils, "async_ssrf_protected_download", async_download)
    monkeypatch.setattr(
        processing_utils,
        "save_url_to_cache",
        lambda url, cache_dir: fetched.append(url) or str(tmp_path / "f.png"),
    )
    model, names = load_model(deep_run.checkpoint)
    page = demo.build_page(Demo(model, names, CPU, precision="fp32", top_k=2), "tiny", [])
    image = next(
        block for block in page.blocks.values() if getattr(block, "elem_id", None) == "image"
    )
    for url in ("http://example.com/cat.png", "HTTPS://example.com/cat.png"):
        with pytest.raises(gr.Error, match="images come from uploads only"):
            image.move_resource_to_block_cache(url)
        with pytest.raises(gr.Error, match="images come from uploads only"):
            asyncio.run(image.async_move_resource_to_block_cache(url))
    assert fetched == []
    upload = tmp_path / "upload.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(upload)
    assert (
        Path(asyncio.run(image.async_move_resource_to_block_cache(str(upload)))).read_bytes()
        == upload.read_bytes()
    )


# ---------------------------------------------------------------------------------------------
# Examples


def test_examples_from_a_folder_or_the_runs_own_images(deep_run, tmp_path, capsys):
    files = find_examples(deep_run.data_dir, deep_run.checkpoint, tmp_path)
    assert len(files) == demo.MAX_EXAMPLES and all(f.endswith(".png") for f in files)
    files = find_examples(None, deep_run.checkpoint, tmp_path)
    assert [Path(f).relative_to(deep_run.data_dir).as_posix() for f in files] == [
        "cat/0.png",
        "dog/0.png",
        "fish/0.png",
    ]
    assert "3 examples (the run's image folder" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"--examples .*empty: no images in this folder"):
        find_examples(tmp_path / "empty", deep_run.checkpoint, tmp_path)


def test_examples_of_a_cifar_run_are_written_from_its_test_split(
    deep_run, tmp_path, monkeypatch, capsys
):
    payload = read_checkpoint(deep_run.checkpoint)
    payload["train_config"] = {
        **payload["train_config"],
        "dataset": "cifar10",
        "data_dir": str(tmp_path / "data"),
    }
    torch.save(payload, tmp_path / "cifar.pt")
    monkeypatch.setattr(demo, "cifar_on_disk", lambda name, root: False)
    assert find_examples(None, tmp_path / "cifar.pt", tmp_path) == []
    assert (
        f"no examples (the run's cifar10 is not at {tmp_path / 'data'}" in capsys.readouterr().out
    )
    images = torch.from_numpy(
        np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    )
    test_split = ImageSet(torch.tensor([1, 0, 0, 1]), ["airplane", "automobile"], images)
    monkeypatch.setattr(demo, "cifar_on_disk", lambda name, root: True)
    monkeypatch.setattr(
        demo,
        "load_cifar",
        lambda name, root, train: test_split if name == "cifar10" and not train else None,
    )
    (tmp_path / "scratch").mkdir()
    files = find_examples(None, tmp_path / "cifar.pt", tmp_path / "scratch")
    assert [Path(f).name for f in files] == ["0_airplane.png", "1_automobile.png"]
    assert np.array_equal(read_image(files[0]), images[1].numpy()) and np.array_equal(
        read_image(files[1]), images[0].numpy()
    )


# ---------------------------------------------------------------------------------------------
# The command's refusals, each one line


def test_without_gradio_the_command_says_how_to_install_it(deep_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    for extra in ([], ["--write-space", str(tmp_path / "space")]):
        assert main(["demo", str(deep_run.checkpoint), *extra]) == 1
        assert (
            one_error_line(capsys)
            == "vitlab demo: error: the demo needs Gradio: pip install 'vitlab[demo]'"
        )
    assert not (tmp_path / "space").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "0"], "--port 0: choose a port from 1 to 65535"),
        (["--top_k", "0"], "--top_k must be positive"),
        (
            ["--write-space", "SPACE", "--share"],
            "--write-space: a Space chooses its own address and is public",
        ),
        (
            ["--write-space", "SPACE", "--port", "8000"],
            "--write-space: a Space chooses its own address and is public",
        ),
    ],
)
def test_bad_flags_are_one_line(flags, message, deep_run, tmp_path, capsys):
    flags = [str(tmp_path / "space") if f == "SPACE" else f for f in flags]
    assert main(["demo", str(deep_run.checkpoint), *flags]) == 2
    assert message in one_error_line(capsys)


def test_a_missing_checkpoint_or_examples_folder_is_one_line(deep_run, tmp_path, capsys):
    pytest.importorskip("gradio")
    assert main(["demo", str(tmp_path / "missing.pt")]) == 1
    assert "missing.pt: no such file" in one_error_line(capsys)
    assert main(["demo", str(deep_run.checkpoint), "--examples", str(tmp_path / "nowhere")]) == 2
    assert "--examples " in one_error_line(capsys)
    (tmp_path / "space" / "taken").mkdir(parents=True)
    assert main(["demo", str(deep_run.checkpoint), "--write-space", str(tmp_path / "space")]) == 2
    assert "exists and is not an empty folder" in one_error_line(capsys)


def test_a_space_needs_vitlab_installed_to_name_its_requirements(monkeypatch):
    def not_installed(name):
        raise space.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(space.metadata, "requires", not_installed)
    with pytest.raises(
        VitlabError,
        match=r"^--write-space reads vitlab's dependencies from its installation: pip install -e \.$",
    ):
        space.vitlab_requirements()


# ---------------------------------------------------------------------------------------------
# Servers in subprocesses, and what they may reach


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Refuse(http.server.BaseHTTPRequestHandler):
    """A proxy that forwards nothing: it records each request and refuses it."""

    def log_message(self, *args):
        pass

    def _refuse(self):
        self.server.requests.append(self.requestline)
        self.send_error(403, "the vitlab tests allow no outside request")

    do_GET = do_POST = do_HEAD = do_PUT = do_CONNECT = do_OPTIONS = _refuse


@contextlib.contextmanager
def recording_proxy():
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    proxy.requests = []
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


def server_env(proxy, pythonpath: bool = True) -> dict:
    """This environment for a server: one thread, vitlab from this checkout (or not), every outgoing request sent to
    `proxy` except those to 127.0.0.1."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    }
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = str(REPO / "src")
    address = f"http://127.0.0.1:{proxy.server_address[1]}"
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        env[name] = env[name.upper()] = address
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    return {**env, "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def running(argv: list[str], cwd: Path, env: dict, log: Path):
    """A server process; yields the URL it prints, ends it after."""
    with open(log, "w") as out:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(1200):  # up to 2 minutes to import torch and Gradio on a busy machine
            found = re.search(r" at (http://127\.0\.0\.1:\d+/)", log.read_text())
            if found or process.poll() is not None:
                break
            time.sleep(0.1)
        assert found, f"the server did not start:\n{log.read_text()}"
        yield found.group(1)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def served(deep_run, tmp_path_factory):
    """`vitlab demo` on the two-layer run, in fp32 on the CPU, with its outgoing requests recorded."""
    pytest.importorskip("gradio")
    folder = tmp_path_factory.mktemp("served")
    argv = [
        sys.executable,
        "-m",
        "vitlab.app.cli",
        "demo",
        str(deep_run.checkpoint),
        "--port",
        str(free_port()),
        "--device",
        "cpu",
        "--precision",
        "fp32",
    ]
    with (
        recording_proxy() as proxy,
        running(argv, folder, server_env(proxy), folder / "server.log") as url,
    ):
        yield SimpleNamespace(
            url=url, run=deep_run, log=folder / "server.log", proxy=proxy, folder=folder
        )


def test_a_port_in_use_is_one_line(served):
    port = urlparse(served.url).port
    argv = [
        sys.executable,
        "-m",
        "vitlab.app.cli",
        "demo",
        str(served.run.checkpoint),
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    with recording_proxy() as proxy:
        done = subprocess.run(
            argv, env=server_env(proxy), capture_output=True, text=True, timeout=300, check=False
        )
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"vitlab demo: error: cannot serve on 127.0.0.1:{port} (")
    assert line.endswith("; choose another --port, or --host")


def bad_files(folder: Path) -> tuple[Path, Path]:
    (folder / "notes.txt").write_text("hello, not an image\n")
    (folder / "broken.png").write_text("hello, not an image either\n")
    return folder / "notes.txt", folder / "broken.png"


def fetched_image(url: str) -> np.ndarray:
    assert urlparse(url).hostname == "127.0.0.1", url
    with urllib.request.urlopen(url, timeout=30) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


def test_the_api_endpoint_through_gradio_client(served, capsys):
    pytest.importorskip("gradio_client")
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(
        served.url, verbose=False, analytics_enabled=False, download_files=str(served.folder)
    )
    assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == [
        "/predict"
    ]
    image = served.run.data_dir / "fish" / "2.png"
    label, overlay_file, info = client.predict(
        handle_file(str(image)), "layer 2", 0.0, api_name="/predict"
    )
    expected = predicted(served.run.checkpoint, image, capsys)
    assert label["label"] == expected[0]["class"]
    got = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert list(got) == [e["class"] for e in expected]
    np.testing.assert_allclose(list(got.values()), [e["probability"] for e in expected], atol=1e-5)
    assert np.array_equal(read_image(overlay_file), read_image(str(image)))  # opacity 0
    assert "3 classes · 16 px" in info and "cpu · fp32 · last prediction" in info
    _, broken = bad_files(served.folder)
    with pytest.raises(AppError, match="broken.png: not a readable image"):
        client.predict(handle_file(str(broken)), "rollout", 0.5, api_name="/predict")
    with pytest.raises(AppError, match="map 'layer 7': choose rollout, layer 1, layer 2"):
        client.predict(handle_file(str(image)), "layer 7", 0.5, api_name="/predict")


def test_the_written_space_runs_as_it_is(deep_run, tmp_path, capsys):
    pytest.importorskip("gradio")
    import gradio
    from gradio_client import Client, handle_file

    space = tmp_path / "space"
    assert (
        main(
            [
                "demo",
                str(deep_run.checkpoint),
                "--write-space",
                str(space),
                "--top_k",
                "2",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in space.iterdir()) == [
        "README.md",
        "app.py",
        "examples",
        "model.safetensors",
        "requirements.txt",
        "vitlab",
    ]
    readme = (space / "README.md").read_text()
    assert (
        readme.startswith("---\n")
        and "\nsdk: gradio\n" in readme
        and f"\nsdk_version: {gradio.__version__}\n" in readme
    )
    assert "\napp_file: app.py\n" in readme.split("---")[1]
    assert any(r.startswith("torch") for r in (space / "requirements.txt").read_text().splitlines())
    assert sorted(p.name for p in (space / "examples").iterdir()) == [
        "00_0.png",
        "01_0.png",
        "02_0.png",
    ]
    _, names = load_model(space / "model.safetensors")
    assert names == deep_run.class_names
    assert (space / "vitlab" / "app" / "demo.py").read_text() == Path(demo.__file__).read_text()
    image = deep_run.data_dir / "cat" / "3.png"
    with recording_proxy() as proxy:
        env = {**server_env(proxy, pythonpath=False), "GRADIO_SERVER_PORT": str(free_port())}
        with running([sys.executable, "app.py"], space, env, tmp_path / "space.log") as url:
            label, _, _ = Client(
                url, verbose=False, analytics_enabled=False, download_files=str(tmp_path)
            ).predict(handle_file(str(image)), "rollout", 0.5, api_name="/predict")
        assert proxy.requests == []
    expected = predicted(deep_run.checkpoint, image, capsys)
    assert [c["label"] for c in label["confidences"]] == [e["class"] for e in expected[:2]]
    assert "Traceback" not in (tmp_path / "space.log").read_text()


# ---------------------------------------------------------------------------------------------
# The page in headless Chromium


@pytest.fixture(scope="module")
def browser(served):
    """Debian's headless Chromium through Selenium, its DNS answering only 127.0.0.1 (the network cut), logging every
    request it makes."""
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no Chromium here: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={served.folder / 'chromium'}",
        "--window-size=1280,900",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    chrome = webdriver.Chrome(service=webdriver.ChromeService(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


def outside_requests(chrome) -> list[str]:
    """The URLs the page asked for (DevTools network events since the last call) on any host but 127.0.0.1."""
    urls = []
    for entry in chrome.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            urls.append(
                message["params"].get("request", {}).get("url") or message["params"].get("url")
            )
    return [
        u
        for u in urls
        if urlparse(u).scheme in ("http", "https", "ws", "wss")
        and urlparse(u).hostname != "127.0.0.1"
    ]


def wait_for(chrome, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(chrome, 60, poll_frequency=0.1).until(
        lambda _: condition(), message=f"waited for {what}"
    )


def test_the_page_predicts_as_predict_does_and_redraws_the_map(browser, served, capsys):
    from selenium.webdriver.common.by import By

    chrome = browser
    chrome.get(served.url)
    image = served.run.data_dir / "dog" / "5.png"
    wait_for(
        chrome, lambda: chrome.find_elements(By.CSS_SELECTOR, "#image input[type=file]"), "the page"
    )
    chrome.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(image))
    top = wait_for(
        chrome, lambda: chrome.find_elements(By.CSS_SELECTOR, "#label meter"), "the top classes"
    )[0]
    expected = predicted(served.run.checkpoint, image, capsys)[0]
    assert (
        chrome.find_element(By.CSS_SELECTOR, "#label [data-testid=label-output-value]").text
        == expected["class"]
    )
    assert top.get_attribute("aria-label") == expected["class"]
    assert float(top.get_attribute("value")) == pytest.approx(expected["probability"], abs=1e-5)
    shown = chrome.find_element(By.CSS_SELECTOR, "#label dd").text
    assert shown == f"{int(expected['probability'] * 100 + 0.5)}%"  # as the page rounds it
    assert "last prediction" in chrome.find_element(By.ID, "model-info").text
    rollout = wait_for(
        chrome,
        lambda: chrome.find_element(By.CSS_SELECTOR, "#overlay img").get_attribute("src"),
        "the overlay",
    )
    chrome.find_element(By.CSS_SELECTOR, "#map label[data-testid='layer 1-radio-label']").click()
    layer = wait_for(
        chrome,
        lambda: (
            (src := chrome.find_element(By.CSS_SELECTOR, "#overlay img").get_attribute("src"))
            != rollout
            and src
        ),
        "the overlay of layer 1",
    )
    assert not np.array_equal(fetched_image(rollout), fetched_image(layer))
    screenshot = served.folder / "demo.png"
    chrome.save_screenshot(str(screenshot))
    with capsys.disabled():
        print(f"\nscreenshot of the demo page: {screenshot}")
    assert outside_requests(chrome) == []


def test_the_page_says_what_is_wrong_with_a_file(browser, served):
    from selenium.webdriver.common.by import By

    chrome = browser
    chrome.get(served.url)
    notes, broken = bad_files(served.folder)

    def upload(path: Path):
        wait_for(
            chrome,
            lambda: chrome.find_elements(By.CSS_SELECTOR, "#image input[type=file]"),
            "the upload field",
        )
        chrome.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(path))

    def says(message: str):
        wait_for(
            chrome,
            lambda: any(
                message in t.text
                for t in chrome.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")
            ),
            f"the message {message!r}",
        )

    upload(notes)
    says("Invalid file type: notes.txt")  # refused by the page itself
    upload(served.run.data_dir / "cat" / "4.png")
    wait_for(
        chrome, lambda: chrome.find_elements(By.CSS_SELECTOR, "#label meter"), "the top classes"
    )
    upload(broken)  # over the last image: the server refuses it and the last results go
    says("broken.png: not a readable image")
    wait_for(
        chrome,
        lambda: not chrome.find_elements(By.CSS_SELECTOR, "#label meter, #overlay img"),
        "the last results to go",
    )
    assert outside_requests(chrome) == []
    assert "Traceback" not in served.log.read_text()


def test_the_server_asked_nothing_of_the_internet(served):
    assert served.proxy.requests == []
