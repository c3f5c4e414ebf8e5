"""Files and folders written whole or not at all, files fetched over the network into them, and the
Hugging Face Hub's files fetched by huggingface_hub into its own cache."""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import CheckpointError, ConfigError


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: a crash leaves the old file
    whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    # mkstemp makes files private; give the permissions a plain open() would
    os.fchmod(fd, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_dir(path: str | os.PathLike, write) -> None:
    """`write(folder)` into a new folder beside `path`, every file fsynced, then renamed to `path`
    (a folder there before is replaced only then): a crash or an error leaves the old folder, or
    none, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes folders private
    try:
        write(tmp)
        for file in tmp.iterdir():
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
        old = path.with_name(f".{path.name}.old") if path.exists() else None
        if old:
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output(
    path: str | os.PathLike, overwrite: bool, inputs: tuple = (), flag: str = "--out"
) -> Path:
    """`path` as a command's output: refused if a file or folder is there, unless `overwrite`, and
    always if it is one of the command's `inputs` or a folder that holds one (writing it would
    destroy what is being read)."""
    path = Path(path)
    for source in inputs:
        source = Path(source)
        if (
            source.exists()
            and path.exists()
            and (path.resolve() == source.resolve() or path.resolve() in source.resolve().parents)
        ):
            raise ConfigError(
                f"{flag} {path}: that would write over the input {source}; choose another {flag}"
            )
    if path.exists() and not overwrite:
        raise ConfigError(
            f"{flag} {path}: already exists; --overwrite replaces it, or choose another {flag}"
        )
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("VITLAB_CACHE", Path.home() / ".cache" / "vitlab"))


def download(
    url: str, destination: str | os.PathLike, progress: bool = True, timeout: float = 60.0
) -> Path:
    """Fetch `url` to `destination` through a temporary file renamed only once every byte has
    arrived."""
    # Not torch.hub.download_url_to_file: no timeout, and it keeps a body cut short as a whole file.
    from tqdm.auto import tqdm

    destination = Path(destination)

    def fetch(f) -> None:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=destination.name, disable=not progress
            ) as bar:
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
        raise CheckpointError(
            f"could not download {url} ({reason}); download it by hand to {destination}"
        ) from None
    return destination


HUB_PREFIX = "hf-hub:"  # timm's spelling of a Hub repository: hf-hub:ORG/NAME[@REVISION]


def fetch_hub(name: str) -> Path:
    """The folder in huggingface_hub's cache that holds `hf-hub:ORG/NAME[@REVISION]`'s config.json,
    its weights (model.safetensors, else pytorch_model.bin) and its preprocessor_config.json if it
    has one, fetched on first use by huggingface_hub as it does everything (HF_HUB_CACHE, HF_TOKEN,
    HF_ENDPOINT, HF_HUB_OFFLINE)."""
    # Not snapshot_download: it would take both weight files and say nothing of a missing one.
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError
    except ImportError:
        raise CheckpointError(
            f"{name}: Hub names need huggingface_hub: pip install 'vitlab[hub]'"
        ) from None
    repo, _, revision = name.removeprefix(HUB_PREFIX).partition("@")

    def get(
        *candidates: str, required: bool = True, revision: str | None = revision or None
    ) -> Path | None:
        missing = None
        for filename in candidates:
            try:
                return Path(hf_hub_download(repo, filename, revision=revision))
            # Not in the repository, or not in the cache and the Hub out of reach
            except EntryNotFoundError as e:
                missing = e
            except (HfHubHTTPError, HFValidationError, OSError) as e:
                raise CheckpointError(f"{name}: {filename}: {_first_line(e)}") from None
        if not required:
            return None
        # LocalEntryNotFoundError: huggingface_hub's own words on why
        if isinstance(missing, FileNotFoundError):
            raise CheckpointError(f"{name}: {' or '.join(candidates)}: {_first_line(missing)}")
        raise CheckpointError(f"{name}: the repository has no {' or '.join(candidates)}")

    config = get("config.json")
    # The cache's snapshots/<commit>/: the other files from the same commit
    commit = config.parent.name
    get("model.safetensors", "pytorch_model.bin", revision=commit)
    get("preprocessor_config.json", required=False, revision=commit)
    return config.parent


def _first_line(error: BaseException) -> str:
    return (str(error).strip() or type(error).__name__).splitlines()[0]
