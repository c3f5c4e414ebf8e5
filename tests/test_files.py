"""Downloads against a local HTTP server: complete, cut off (an existing file kept), not found, unreachable; folders
written whole or not at all."""

from __future__ import annotations

import socket

import pytest

from vitlab.errors import CheckpointError
from vitlab.formats import files


def test_download_complete(server, tmp_path):
    httpd, base = server
    destination = tmp_path / "cache" / "file.npz"
    assert (
        files.download(f"{base}/files/file.npz", destination, progress=False, timeout=10)
        == destination
    )
    assert destination.read_bytes() == httpd.payload
    assert sorted(p.name for p in destination.parent.iterdir()) == ["file.npz"]
    assert httpd.requests == ["/files/file.npz"]


def test_download_cut_off(server, tmp_path):
    _, base = server
    destination = tmp_path / "cache" / "file.npz"
    with pytest.raises(CheckpointError) as info:
        files.download(f"{base}/cut/file.npz", destination, progress=False, timeout=10)
    message = str(info.value)
    assert f"{base}/cut/file.npz" in message and str(destination) in message
    assert not destination.exists()
    assert list(destination.parent.iterdir()) == []  # no .part left behind


def test_download_cut_off_keeps_an_existing_file(server, tmp_path):
    _, base = server
    destination = tmp_path / "file.npz"
    destination.write_bytes(b"the old, complete file")
    with pytest.raises(CheckpointError):
        files.download(f"{base}/cut/file.npz", destination, progress=False, timeout=10)
    assert destination.read_bytes() == b"the old, complete file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.npz"]


def test_download_not_found(server, tmp_path):
    _, base = server
    url, destination = f"{base}/nothing/here.npz", tmp_path / "here.npz"
    with pytest.raises(CheckpointError) as info:
        files.download(url, destination, progress=False, timeout=10)
    message = str(info.value)
    assert url in message and str(destination) in message and "Not Found" in message
    assert list(tmp_path.iterdir()) == []


def test_download_unreachable(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, destination = f"http://127.0.0.1:{port}/file.npz", tmp_path / "file.npz"
    with pytest.raises(CheckpointError) as info:
        files.download(url, destination, progress=False, timeout=10)
    assert url in str(info.value) and str(destination) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    out = tmp_path / "model"

    def write(content):
        def into(folder):
            (folder / "a.json").write_text(content)
            if content == "fails":
                raise RuntimeError("the check failed")

        return into

    files.atomic_write_dir(out, write("one"))
    files.atomic_write_dir(out, write("two"))
    assert (out / "a.json").read_text() == "two"
    with pytest.raises(RuntimeError):
        files.atomic_write_dir(out, write("fails"))
    assert (out / "a.json").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary or old folder left
