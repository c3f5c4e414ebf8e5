"""Shared fixtures: the shared data directory, a helper that randomises every parameter, a tiny trained run, and
local HTTP servers (plain files, and the Hugging Face Hub's file API)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from vitlab import timings

REPO = Path(__file__).resolve().parents[1]


# The timing of two ways to compute a layer (vitlab.timings), as vitlab measures it; tests/test_timings.py times with it.
REAL_MEASURE = timings.measure


@pytest.fixture(scope="session", autouse=True)
def fixed_verdicts(tmp_path_factory):
    """The tests' own VITLAB_CACHE, for this process and the commands it starts (the fast paths' verdicts of the tests'
    tiny shapes stay out of the user's cache), and in this process every fast path timed as the faster, as the
    AVX-512 policy had them: which kernel computes a test's numbers does not depend on how busy the machine was. The
    paths still check themselves before use."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VITLAB_CACHE", str(tmp_path_factory.mktemp("vitlab-cache")))
        patch.setattr(timings, "measure", lambda fast, plain: (0.0, 1.0))
        yield


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's shared data directory ($VITLAB_SHARED, else <repo>/../shared); skips when absent."""
    path = Path(os.environ.get("VITLAB_SHARED", REPO.parent / "shared"))
    if not path.is_dir():
        pytest.skip(f"shared directory {path} is not present")
    return path


def randomise_parameters(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Give every parameter seeded random values, so that nothing is trivially zero or one: norm scales and layer
    scales 1 + N(0, std), everything else N(0, std) (head, class token, registers, position embedding included). A
    layer scale at its init (1e-5) would hide a wrong key in its block; at 1 + N(0, std) every block counts."""
    generator = torch.Generator().manual_seed(seed)
    scales = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None
    } | {id(p) for name, p in model.named_parameters() if name.endswith(".gamma")}
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32) * std
            p.copy_(1.0 + noise if id(p) in scales else noise)
    return model


@pytest.fixture(scope="session")
def randomise():
    return randomise_parameters


# The tests' tiny ViT from scratch, as settings of a training run (`vitlab train` flags, TrainConfig fields); fp32,
# whose rounding the tests' bounds assume (`auto` is bf16 on some CPUs).
TINY = dict(
    precision="fp32",
    model_type="Ti/16",
    patch_size=4,
    img_size=16,
    depth=1,
    hidden_size=16,
    num_heads=2,
    mlp_dim=32,
    pretrained_dir="none",
)


def train_tiny(root: Path, **model_overrides) -> SimpleNamespace:
    """A tiny ViT (depth 1 unless overridden) trained for 3 steps on a folder of random 16 px PNGs in 3 classes
    (8 images each), under `root`: `.checkpoint` (its best.pt), `.data_dir` and `.class_names`."""
    from PIL import Image

    from vitlab.config import TrainConfig
    from vitlab.train import train

    data_dir, class_names = root / "images", ["cat", "dog", "fish"]
    rng = np.random.default_rng(0)
    for name in class_names:
        (data_dir / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                data_dir / name / f"{i}.png"
            )
    config = TrainConfig.from_dict(
        {
            **dict(
                name="tiny",
                dataset="imagefolder",
                data_dir=str(data_dir),
                **TINY,
                num_steps=3,
                train_batch_size=8,
                eval_every=3,
                warmup_steps=0,
                device="cpu",
                output_dir=str(root),
                log_dir=str(root / "logs"),
                val_split=0.25,
                num_workers=0,
            ),
            **model_overrides,
        }
    )
    train(config)
    return SimpleNamespace(
        checkpoint=root / "tiny" / "best.pt", data_dir=data_dir, class_names=class_names
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`train_tiny`'s run, for the tests of the inference commands."""
    return train_tiny(tmp_path_factory.mktemp("tiny_run"))


# ---------------------------------------------------------------------------------------------
# A local HTTP server for the downloaders

SERVED_BYTES = np.random.default_rng(3).bytes(2_500_000)  # more than one 1 MiB read


class _Handler(http.server.BaseHTTPRequestHandler):
    requests: list[str]  # set per server

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path.startswith("/files/"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(SERVED_BYTES)))
            self.end_headers()
            self.wfile.write(SERVED_BYTES)
        elif self.path.startswith("/cut/"):  # promises every byte, sends half, hangs up
            self.send_response(200)
            self.send_header("Content-Length", str(len(SERVED_BYTES)))
            self.end_headers()
            self.wfile.write(SERVED_BYTES[: len(SERVED_BYTES) // 2])
            self.wfile.flush()
            self.close_connection = True
        else:
            self.send_error(404, "Not Found")


def _serve(handler, **attributes):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.requests = []
    for name, value in attributes.items():
        setattr(httpd, name, value)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture
def server():
    """A local HTTP server: /files/* serves SERVED_BYTES (also as httpd.payload), /cut/* hangs up half-way, else 404."""
    yield from _serve(_Handler, payload=SERVED_BYTES)


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """What huggingface_hub's hf_hub_download asks of the Hub: HEAD and GET of /ORG/NAME/resolve/REVISION/FILE, answered
    with the commit, ETag and size headers, and the X-Error-Code by which it tells a missing repository, revision or file."""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.resolve(send_body=False)

    def do_GET(self):
        self.resolve(send_body=True)

    def resolve(self, send_body: bool) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/([^?]+)", self.path)
        repo = self.server.repos.get(match[1]) if match else None
        if repo is None:
            return self.refuse(401, "RepoNotFound")
        if match[2] not in ("main", HUB_COMMIT):
            return self.refuse(404, "RevisionNotFound")
        if match[3] not in repo:
            return self.refuse(404, "EntryNotFound")
        data = repo[match[3]]
        self.send_response(200)
        self.send_header("X-Repo-Commit", HUB_COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def refuse(self, status: int, code: str) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def hub():
    """A local stand-in for the Hugging Face Hub (point HF_ENDPOINT at it): httpd.repos maps "ORG/NAME" to {file: bytes},
    served at revision main and httpd.commit; httpd.requests lists every request."""
    yield from _serve(_HubHandler, repos={}, commit=HUB_COMMIT)


def vitlab_processes(commands: list[list[str]], env: dict[str, str]) -> list[dict]:
    """Each command run by vitlab.app.cli.main in one fresh Python process, since huggingface_hub reads HF_ENDPOINT, HF_HOME and
    HF_HUB_OFFLINE when it is imported: its exit code, stdout and stderr."""
    script = (
        "import contextlib, io, json, sys\nfrom vitlab.app.cli import main\nresults = []\n"
        "for argv in json.loads(sys.argv[1]):\n    out, err = io.StringIO(), io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n        code = main(argv)\n"
        "    results.append({'code': code, 'out': out.getvalue(), 'err': err.getvalue()})\nprint(json.dumps(results))\n"
    )
    hub_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    hub_env.update(
        PYTHONPATH=str(REPO / "src"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        **env,
    )
    run = subprocess.run(
        [sys.executable, "-c", script, json.dumps(commands)],
        env=hub_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def unit_images(batch: int = 4, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Random images in [0, 1] and the same normalised to [-1, 1], as the pipeline holds them."""
    y = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return y, y * 2 - 1
