"""vitlab's own files and the loaders every command uses: safetensors and a run's .pt round trips, weights of
another function refused, and every kind of bad file."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vitlab.config import get_config
from vitlab.errors import CheckpointError
from vitlab.formats import checkpoints, weights
from vitlab.model import create_model

from parity import state_equal


def test_safetensors_round_trip(tmp_path, randomise):
    source = randomise(
        create_model("Ti/16", num_classes=3, img_size=32, depth=2, representation_size=24), seed=31
    )
    names = ["cat", "dög", "fish 🐟"]
    path = tmp_path / "model.safetensors"
    weights.save_safetensors(source, path, class_names=names)
    loaded, loaded_names = checkpoints.load_model(path)
    assert loaded_names == names
    assert loaded.config == source.config
    state_equal(source, loaded)

    plain = tmp_path / "plain.safetensors"
    weights.save_safetensors(source, plain)
    assert weights.read_weights(plain).class_names is None
    _, no_names = checkpoints.load_model(plain)
    assert no_names == ["class 0", "class 1", "class 2"]


def test_safetensors_bad_files(tmp_path):
    from safetensors.torch import save_file

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        checkpoints.load_model(garbage)
    with pytest.raises(CheckpointError, match="absent.safetensors: no such file"):
        checkpoints.load_model(tmp_path / "absent.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="neither a vitlab, timm nor transformers ViT"):
        checkpoints.load_model(foreign)


def test_training_checkpoint_round_trip(tmp_path, randomise):
    model = randomise(create_model("Ti/16", num_classes=10, img_size=32, depth=1), seed=41)
    optimizer, scaler = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        torch.amp.GradScaler("cpu", enabled=False),
    )
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # momentum buffers to save
    path = tmp_path / "deep" / "ckpt.pt"
    progress = {"step": 7, "best": {"accuracy": 0.5, "step": 6}}
    run = checkpoints.RunState(["c"] * 10, {"name": "x"}, optimizer, scaler, progress)
    checkpoints.save_training_checkpoint(path, model, run)
    # No temporary file left beside it
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]
    read = checkpoints.read_checkpoint(path)
    assert (
        read["step"] == 7
        and read["model_config"] == model.config.to_dict()
        and read["class_names"] == ["c"] * 10
    )
    for key, value in model.state_dict().items():
        assert torch.equal(read["model"][key], value)
    fresh = create_model("Ti/16", num_classes=10, img_size=32, depth=1)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    payload = checkpoints.restore_training_checkpoint(
        read,
        path,
        fresh,
        optimizer=fresh_optimizer,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
    )
    assert payload["best"] == progress["best"] and payload["train_config"] == {"name": "x"}
    state_equal(fresh, model)
    restored = fresh_optimizer.state_dict()["state"]
    for key, value in optimizer.state_dict()["state"].items():
        assert torch.equal(restored[key]["momentum_buffer"], value["momentum_buffer"])


@pytest.mark.parametrize(
    "change",
    [
        {"gelu": "exact"},
        {"num_heads": 6},
        {"layer_norm_eps": 1e-12},
        {"classifier": "gap", "final_norm": "after_pool"},
    ],
)
def test_weights_of_another_function_are_refused(change, tmp_path, randomise):
    # Heads and GELU form change what the weights compute, not their shapes: loading must not pass silently.
    source = randomise(
        create_model("Ti/16", num_classes=10, img_size=32, depth=1, **change), seed=42
    )
    pt, st = tmp_path / "run.pt", tmp_path / "run.safetensors"
    torch.save({"model": source.state_dict(), "model_config": source.config.to_dict()}, pt)
    weights.save_safetensors(source, st)
    field, value = list(change.items())[-1]
    # The same shapes, but for the function field
    shape = {k: v for k, v in change.items() if k == "classifier"}
    for path in (pt, st):
        with pytest.raises(CheckpointError, match=f"trained with --{field} {value}"):
            checkpoints.load_pretrained(
                create_model("Ti/16", num_classes=10, img_size=32, depth=1, **shape),
                path,
                verbose=False,
            )
        same = checkpoints.load_pretrained(
            create_model("Ti/16", num_classes=10, img_size=32, depth=1, **change),
            path,
            verbose=False,
        )
        torch.testing.assert_close(same.state_dict(), source.state_dict())


class _NotATensor:
    def __init__(self):
        self.value = 3


def test_read_checkpoint_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        checkpoints.read_checkpoint(tmp_path / "absent.pt")

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(2).bytes(5000))
    with pytest.raises(CheckpointError, match="not a readable vitlab checkpoint") as info:
        checkpoints.read_checkpoint(garbage)
    assert str(garbage) in str(info.value)

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, foreign)
    with pytest.raises(CheckpointError, match="not a vitlab checkpoint"):
        checkpoints.read_checkpoint(foreign)

    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match="not a vitlab checkpoint"):
        checkpoints.read_checkpoint(tensor)

    unsafe = tmp_path / "unsafe.pt"
    with open(unsafe, "wb") as f:
        pickle.dump({"model": _NotATensor(), "model_config": {}}, f, protocol=2)
    with pytest.raises(CheckpointError, match="not a readable vitlab checkpoint"):
        checkpoints.read_checkpoint(unsafe)


def flip_bytes_in_largest_tensor(path, count: int = 16) -> None:
    """Overwrite `count` bytes in the middle of the zip member holding the most data (a weight), leaving the archive's
    structure intact: what a bad disk sector or a faulty copy does."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = (
        int.from_bytes(data[member.header_offset + 26 : member.header_offset + 28], "little"),
        int.from_bytes(data[member.header_offset + 28 : member.header_offset + 30], "little"),
    )
    start = member.header_offset + 30 + name_length + extra_length + member.compress_size // 2
    data[start : start + count] = bytes(255 - b for b in data[start : start + count])
    path.write_bytes(bytes(data))


def test_damaged_torch_files_are_refused_in_our_words(tmp_path, randomise):
    model = randomise(create_model("Ti/16", num_classes=3, img_size=32, depth=1), seed=43)
    good = tmp_path / "good.pt"
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict()}, good)

    empty = tmp_path / "empty.pt"
    empty.touch()
    with pytest.raises(CheckpointError, match=r"empty.pt: an empty file, not a vitlab checkpoint$"):
        checkpoints.read_checkpoint(empty)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(
        CheckpointError,
        match=r"truncated.pt: not a readable vitlab checkpoint \(not a complete torch zip archive",
    ):
        checkpoints.read_checkpoint(truncated)

    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(good.read_bytes())
    flip_bytes_in_largest_tensor(flipped)
    with pytest.raises(
        CheckpointError,
        match=r"flipped.pt: corrupt: \S+ fails its CRC-32 check; nothing was loaded$",
    ):
        checkpoints.read_checkpoint(flipped)

    objects = tmp_path / "objects.pt"
    # A zip whose pickle holds a class instance
    torch.save({"model": _NotATensor(), "model_config": {}}, objects)
    with pytest.raises(CheckpointError) as info:
        checkpoints.read_checkpoint(objects)
    message = str(info.value)
    assert message.endswith(
        "it holds Python objects other than tensors, which vitlab refuses to load"
    )
    assert "weights_only" not in message and "\n" not in message


def test_a_damaged_safetensors_file_is_refused(tmp_path, randomise):
    model = randomise(create_model("Ti/16", num_classes=3, img_size=32, depth=1), seed=44)
    path = tmp_path / "model.safetensors"
    weights.save_safetensors(model, path, ["a", "b", "c"])
    data = bytearray(path.read_bytes())
    data[-4000:-3984] = bytes(255 - b for b in data[-4000:-3984])  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError,
        match="corrupt: its tensors do not match the checksum written with them; nothing was loaded",
    ):
        checkpoints.load_model(path)


def test_a_checkpoint_that_cannot_continue_the_run_is_refused_before_loading(tmp_path):
    model = create_model("Ti/16", num_classes=10, img_size=32, depth=1)
    path = tmp_path / "weights.pt"
    weights_only = {"model": model.state_dict(), "model_config": model.config.to_dict()}
    with pytest.raises(CheckpointError, match="holds no training state \\(optimizer\\)"):
        checkpoints.check_training_state(weights_only, path, model.config)
    run = {**weights_only, "optimizer": {}, "scaler": {}, "step": 3, "best": {}, "train_config": {}}
    checkpoints.check_training_state(run, path, model.config)
    with pytest.raises(CheckpointError, match="trained with --gelu tanh"):
        checkpoints.check_training_state(run, path, model.config.replace(gelu="exact"))


# ---------------------------------------------------------------------------------------------
# Fine-tuning: the model a pretrained file says, with the task's own settings


def dinov2_file(tmp_path, randomise, **changes):
    """A tiny DINOv2-shaped vitlab file with no head (a backbone, as DINOv2 is released)."""
    config = get_config(
        "dinov2-S/14", depth=1, hidden_size=48, num_heads=3, mlp_dim=96, img_size=28
    )
    model = randomise(create_model(config.replace(classifier="token", num_classes=5, **changes)))
    path = tmp_path / "backbone.safetensors"
    weights.save_safetensors(model, path)
    # drop the head: a feature extractor's file
    state = {k: v for k, v in load_file(path).items() if not k.startswith("head.")}
    metadata = {"model_config": json.dumps(model.config.to_dict())}
    save_file(state, path, metadata=metadata)
    return model, path


def test_fine_tuning_takes_the_files_model_with_the_tasks_settings(tmp_path, randomise, capsys):
    source, path = dinov2_file(tmp_path, randomise, gelu="tanh")
    wanted = get_config(
        "dinov2-S/14", depth=1, hidden_size=48, num_heads=3, mlp_dim=96, img_size=42, num_classes=3
    )
    model = checkpoints.pretrained_model(path, wanted)
    # the task's classes, size and pooling (the file has no head); the file's function
    assert (model.config.num_classes, model.config.img_size) == (3, 42)
    assert model.config.classifier == "token_gap" and model.config.gelu == "tanh"
    assert "computes as its file says: gelu tanh (not exact)" in capsys.readouterr().out
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert model.head.weight.abs().sum() == 0 and model.head.in_features == 96
    # a function the user chose, which the weights contradict
    with pytest.raises(CheckpointError, match="compute with gelu tanh; --gelu would make"):
        checkpoints.pretrained_model(path, wanted, chosen=frozenset({"gelu"}))


def test_fine_tuning_refuses_a_model_of_another_shape(tmp_path, randomise):
    _, path = dinov2_file(tmp_path, randomise)
    wanted = get_config("S/16", depth=1, hidden_size=48, num_heads=3, mlp_dim=96, img_size=32)
    with pytest.raises(CheckpointError, match="its model has patch_size 14, .*not patch_size 16"):
        checkpoints.pretrained_model(path, wanted)
    registers = get_config("dinov2-reg-S/14", depth=1, hidden_size=48, num_heads=3, mlp_dim=96)
    with pytest.raises(
        CheckpointError, match="reg_tokens 0, pos_embed_prefix True, not reg_tokens 4"
    ):
        checkpoints.pretrained_model(path, registers)
    # the message names a variant of the file's shape where there is one
    weights.save_safetensors(create_model("testing", img_size=32), tmp_path / "testing.safetensors")
    with pytest.raises(CheckpointError, match="pass --model_type testing$"):
        checkpoints.pretrained_model(tmp_path / "testing.safetensors", get_config("Ti/16"))
