"""Foreign backbones: DINO, DINO4Cells and timm-style files recognized, loaded safely, or refused clearly."""

import argparse
import os

import pytest
import torch

from protloc.checkpoint import load_weights
from protloc.errors import ProtlocError
from protloc.foreign import backbone_state, infer_config, read_weights_file
from protloc.model import ViTConfig, VisionTransformer


def backbone(in_chans=3, patch=16, depth=2, arch="vit_tiny", seed=0):
    torch.manual_seed(seed)
    channels = (["microtubules", "protein", "nucleus", "er"][:in_chans] if in_chans <= 4
                else [f"c{i}" for i in range(in_chans)])
    return VisionTransformer(ViTConfig(arch=arch, patch=patch, depth=depth, channels=channels, img_size=224))


def dino_training_checkpoint(teacher, student):
    """What DINO's main_dino.py saves: DDP-wrapped student, plain teacher, heads, argparse args."""
    head = {"head.mlp.0.weight": torch.zeros(8, teacher.dim), "head.last_layer.weight_g": torch.ones(16, 1)}
    return {"student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                        **{f"module.{k}": v for k, v in head.items()}},
            "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head},
            "optimizer": {"state": {}, "param_groups": []}, "epoch": 100,
            "args": argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=65536),
            "dino_loss": {"center": torch.zeros(1, 16)}}


def load(path, channels=None):
    state, kind = backbone_state(read_weights_file(path), path)
    model = VisionTransformer(infer_config(state, path, channels))
    load_weights(model, state, str(path))
    return model, kind


def same_weights(a, b):
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_dino_training_checkpoint_gives_the_teacher_backbone(tmp_path):
    teacher, student = backbone(seed=1), backbone(seed=2)
    path = tmp_path / "checkpoint.pth"
    torch.save(dino_training_checkpoint(teacher, student), path)
    model, kind = load(path)
    assert "teacher" in kind and same_weights(model, teacher) and not same_weights(model, student)
    cfg = model.config
    assert (cfg.arch, cfg.patch, cfg.depth, cfg.img_size, cfg.channels) == ("vit_tiny", 16, 2, 224,
                                                                            ["microtubules", "protein", "nucleus"])
    assert cfg.normalize == "imagenet"  # an RGB backbone expects ImageNet statistics


def test_dino4cells_four_channel_patch8_checkpoint(tmp_path):
    teacher = backbone(in_chans=4, patch=8, depth=3, arch="vit_small")
    torch.save(dino_training_checkpoint(teacher, teacher), tmp_path / "dino4cells.pth")
    model, _ = load(tmp_path / "dino4cells.pth")
    assert (model.config.arch, model.config.patch, model.config.depth) == ("vit_small", 8, 3)
    assert model.config.channels == ["microtubules", "protein", "nucleus", "er"] and model.config.normalize == "image"
    assert same_weights(model, teacher)


def test_backbone_only_and_timm_style_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    ref = backbone()
    torch.save(ref.state_dict(), tmp_path / "dino_deittiny16_pretrain.pth")
    timm_like = {**ref.state_dict(), "head.weight": torch.zeros(1000, 192), "head.bias": torch.zeros(1000)}
    torch.save({"model": timm_like}, tmp_path / "timm.pth")
    save_file(timm_like, str(tmp_path / "vit.safetensors"))
    for name in ("dino_deittiny16_pretrain.pth", "timm.pth", "vit.safetensors"):
        model, _ = load(tmp_path / name, channels=["er", "protein", "nucleus"])
        assert same_weights(model, ref), name
        assert model.config.channels == ["er", "protein", "nucleus"]  # --model-channels wins


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    Exploit.marker = marker
    path = tmp_path / "evil.pth"
    torch.save({"teacher": backbone().state_dict(), "payload": Exploit()}, path)
    with pytest.raises(ProtlocError, match="refused to load"):
        read_weights_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s.pop("patch_embed.proj.weight"), "not a ViT backbone"),
    (lambda s: s.update({"patch_embed.proj.weight": torch.zeros(100, 3, 16, 16)}), "embedding dimension 100"),
    (lambda s: s.update({"pos_embed": torch.zeros(1, 197 + 3, 192)}), "square grid"),
])
def test_weights_that_are_no_vit_say_why(tmp_path, mutate, message):
    state = backbone().state_dict()
    mutate(state)
    with pytest.raises(ProtlocError, match=message):
        infer_config(state, "x.pth")


def test_channel_count_must_be_named_and_must_fit(tmp_path):
    state = backbone(in_chans=2).state_dict()
    with pytest.raises(ProtlocError, match="name its channels with --model-channels"):
        infer_config(state, "x.pth")
    with pytest.raises(ProtlocError, match="takes 2 channel.*not the 1 named: nucleus"):
        infer_config(state, "x.pth", ["nucleus"])


def test_foreign_layer_scale_is_a_listed_mismatch(tmp_path):
    state = backbone().state_dict()
    state["blocks.0.ls1.gamma"] = torch.ones(192)  # e.g. a DINOv2-style block: not this architecture
    model = VisionTransformer(infer_config(state, "x.pth"))
    with pytest.raises(ProtlocError, match=r"1 unexpected \(blocks.0.ls1.gamma\)"):
        load_weights(model, state, "x.pth")


def test_unreadable_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ProtlocError, match="not a readable torch checkpoint"):
        read_weights_file(tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ProtlocError, match="not a readable safetensors file"):
        read_weights_file(tmp_path / "junk.safetensors")
    with pytest.raises(ProtlocError, match="no such file"):
        read_weights_file(tmp_path / "missing.pth")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(ProtlocError, match="no ViT weights found"):
        backbone_state(read_weights_file(tmp_path / "empty.pth"), "empty.pth")


def test_model_from_checkpoint_takes_foreign_files_and_pretrain_init_continues_them(tmp_path):
    from protloc.augment import MultiCropConfig
    from protloc.checkpoint import model_from_checkpoint
    from protloc.pretrain import PretrainConfig, Trainer
    from protloc.sources import discover
    from protloc.synth import write_dataset

    torch.manual_seed(0)
    teacher = VisionTransformer(ViTConfig(arch="vit_tiny", patch=8, depth=1, channels=["nucleus", "protein"]))
    path = tmp_path / "dino_checkpoint.pth"
    torch.save(dino_training_checkpoint(teacher, teacher), path)
    with pytest.raises(ProtlocError, match="name its channels with --model-channels"):
        model_from_checkpoint(path)
    model, ckpt = model_from_checkpoint(path, ["nucleus", "protein"])
    assert "teacher" in ckpt["foreign"] and same_weights(model, teacher)

    write_dataset(tmp_path / "cells", n=4, size=48, seed=0)
    cfg = PretrainConfig(arch="vit_tiny", patch=8, depth=1, out_dim=32, batch_size=2, steps=1, freeze_last_layer=0.0,
                         crops=MultiCropConfig(global_size=32, local_size=16, local_crops=0))
    trainer = Trainer(discover([str(tmp_path / "cells")]), cfg, tmp_path / "continued.pt", workers=0, init=str(path))
    assert torch.equal(trainer.student.backbone.pos_embed, teacher.pos_embed)  # started from the DINO teacher
    trainer.run()
