"""Checkpoints: round trip, atomic writes, safe loading, clear mismatch errors."""

import os
import pickle

import pytest
import torch

from protloc.checkpoint import load_checkpoint, load_weights, model_from_checkpoint, save_checkpoint
from protloc.errors import ProtlocError
from protloc.model import ViTConfig, VisionTransformer


def small_model(**kw):
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(arch="vit_tiny", patch=8, depth=2, img_size=32, **kw)).eval()


def test_round_trip_gives_the_same_model(tmp_path):
    model = small_model(layout="channel")
    path = tmp_path / "m.pt"
    save_checkpoint(path, model.config, model.state_dict(), step=7)
    assert os.listdir(tmp_path) == ["m.pt"]  # no temporary file left behind
    loaded, ckpt = model_from_checkpoint(path)
    assert ckpt["step"] == 7 and loaded.config == model.config
    x = torch.rand(2, 2, 32, 32), torch.ones(2, 2), torch.zeros(2, 2)
    torch.testing.assert_close(loaded.eval().embed(*x, ["nucleus", "protein"]), model.embed(*x, ["nucleus", "protein"]))
    # plain data only: loads with weights_only=True
    assert isinstance(torch.load(path, weights_only=True)["config"], dict)


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    model = small_model()
    path = tmp_path / "m.pt"
    save_checkpoint(path, model.config, model.state_dict(), step=1)
    def broken_save(obj, f):
        open(f, "wb").write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, model.config, model.state_dict(), step=2)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["m.pt"]


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))  # unpickling this would create a file


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "protloc", "model": _Exploit(str(target))}, path)
    with pytest.raises(ProtlocError, match="refused"):
        load_checkpoint(path)
    assert not target.exists()
    raw = tmp_path / "raw.pkl"  # a plain pickle, not even a torch zip
    raw.write_bytes(pickle.dumps(_Exploit(str(target))))
    with pytest.raises(ProtlocError):
        load_checkpoint(raw)
    assert not target.exists()


@pytest.mark.parametrize("content,match", [
    (None, "no such file"),
    (b"", "not a readable torch checkpoint"),
    (b"this is text", "not a readable torch checkpoint"),
])
def test_unreadable_files(tmp_path, content, match):
    path = tmp_path / "x.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ProtlocError, match=match):
        load_checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    model = small_model()
    path = tmp_path / "m.pt"
    save_checkpoint(path, model.config, model.state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ProtlocError, match=str(path)):
        load_checkpoint(path)


def test_foreign_dict_is_not_a_protloc_checkpoint(tmp_path):
    path = tmp_path / "dino.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 8)}}, path)
    with pytest.raises(ProtlocError, match="not a protloc checkpoint"):
        load_checkpoint(path)


def test_mismatch_lists_missing_unexpected_and_misshaped_keys():
    model = small_model()
    state = dict(model.state_dict())
    del state["norm.weight"]
    state["head.weight"] = torch.zeros(3)
    state["pos_embed"] = torch.zeros(1, 5, 192)
    with pytest.raises(ProtlocError) as err:
        load_weights(model, state, "foreign.pth")
    msg = str(err.value)
    assert "foreign.pth" in msg and "norm.weight" in msg and "head.weight" in msg
    assert "pos_embed (1, 5, 192) vs (1, 17, 192)" in msg and "\n" not in msg
