"""Files written whole or not at all, and files fetched over the network into them."""

from __future__ import annotations

import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .errors import CheckpointError


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: a crash leaves the old file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes files private; give the permissions a plain open() would
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_dir() -> Path:
    return Path(os.environ.get("VITLAB_CACHE", Path.home() / ".cache" / "vitlab"))


def download(url: str, destination: str | os.PathLike, progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch `url` to `destination` through a temporary file renamed only once every byte has arrived."""
    from tqdm.auto import tqdm

    destination = Path(destination)

    def fetch(f) -> None:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name, disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise OSError(f"connection closed after {received} of {total} bytes")

    try:
        atomic_write(destination, fetch)
    except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise CheckpointError(f"could not download {url} ({reason}); download it by hand to {destination}") from None
    return destination
