"""Shared fixtures: the shared data directory, a helper that randomises every parameter, and a tiny trained run."""

from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's shared data directory ($VITLAB_SHARED, else <repo>/../shared); skips when absent."""
    path = Path(os.environ.get("VITLAB_SHARED", REPO.parent / "shared"))
    if not path.is_dir():
        pytest.skip(f"shared directory {path} is not present")
    return path


def randomise_parameters(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Give every parameter seeded random values, so that nothing is trivially zero or one:
    norm scales 1 + N(0, std), everything else N(0, std) (head, class token, position embedding included)."""
    generator = torch.Generator().manual_seed(seed)
    scales = {id(m.weight) for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None}
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32) * std
            p.copy_(1.0 + noise if id(p) in scales else noise)
    return model


@pytest.fixture(scope="session")
def randomise():
    return randomise_parameters


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny ViT trained for 3 steps on a folder of random 16 px PNGs in 3 classes (8 images each):
    `.checkpoint` (its best.pt), `.data_dir` and `.class_names`, for the tests of the inference commands."""
    import numpy as np
    from PIL import Image

    from vitlab.config import TrainConfig
    from vitlab.train import train

    root = tmp_path_factory.mktemp("tiny_run")
    data_dir, class_names = root / "images", ["cat", "dog", "fish"]
    rng = np.random.default_rng(0)
    for name in class_names:
        (data_dir / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data_dir / name / f"{i}.png")
    config = TrainConfig.from_dict(dict(
        name="tiny", dataset="imagefolder", data_dir=str(data_dir), model_type="Ti/16", patch_size=4, img_size=16, depth=1,
        hidden_size=16, num_heads=2, mlp_dim=32, pretrained_dir="none", num_steps=3, train_batch_size=8, eval_every=3,
        warmup_steps=0, device="cpu", output_dir=str(root), log_dir=str(root / "logs"), val_split=0.25, num_workers=0,
    ))  # fmt: skip
    train(config)
    return SimpleNamespace(checkpoint=root / "tiny" / "best.pt", data_dir=data_dir, class_names=class_names)


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


@pytest.fixture
def server():
    """A local HTTP server: /files/* serves SERVED_BYTES (also as httpd.payload), /cut/* hangs up half-way, else 404."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests, httpd.payload = [], SERVED_BYTES
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)

