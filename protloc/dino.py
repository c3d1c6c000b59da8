"""DINO self-distillation (Caron et al. 2021): projection head, loss, teacher EMA, schedules.

A student and a teacher network (same ViT + head) see different crops of the same images. The
teacher's outputs on the 2 global crops, centered and sharpened, are the targets for the
student's outputs on every other crop (global and local); the teacher is an exponential moving
average of the student. Centering (a running mean of teacher outputs) and sharpening (a low
teacher temperature) together keep the outputs from collapsing to one dimension or to uniform.
Names and defaults follow the reference implementation (facebookresearch/dino). DINOv2's and
iBOT's additions (Sinkhorn-Knopp targets, the masked-patch loss) plug in here; see protloc.dinov2.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from protloc import kernels
from protloc.dinov2 import sinkhorn_knopp
from protloc.model import no_scaling


class WeightNormLinear(nn.Module):
    """Linear layer without bias, weight = g * v / ||v|| per output row (DINO's `last_layer`).

    Written out instead of torch's weight_norm so the parameter names are DINO's
    (`weight_g`, `weight_v`) and nothing is deprecated under our feet."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    def forward(self, x):
        # x (n, in) -> (n, out). x @ (g * v / ||v||)^T computed as (x @ v^T) * (g / ||v||)^T: the
        # same product without materializing the normalized (out, in) weight and its gradient
        # (65536 x 256 in DINO's head, three passes over 64 MiB per call); ||v|| floored as F.normalize
        scale = self.weight_g.t() / self.weight_v.norm(dim=1).clamp_min(1e-12)  # (1, out)
        return F.linear(x, self.weight_v) * scale


class DINOHead(nn.Module):
    """3-layer MLP -> L2-normalized bottleneck -> weight-normalized linear to out_dim logits.

    `use_bn` puts batch norm after the two hidden layers (DINO's --use_bn_in_head). It makes the
    head see how the images of a batch differ from each other from the first step, which a
    short run needs: a random backbone gives nearly the same CLS vector for every image, the
    centered teacher output is then uniform, and without batch norm the loss sits at
    log(out_dim) for hundreds of steps before learning starts."""

    def __init__(self, in_dim, out_dim=65536, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True, use_bn=False):
        super().__init__()
        layers = []  # as in DINO, so parameter names match its checkpoints: mlp.0, mlp.2 (mlp.3 with bn), ...
        for d in (in_dim, hidden_dim):
            layers += [nn.Linear(d, hidden_dim)] + ([nn.BatchNorm1d(hidden_dim)] if use_bn else []) + [nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        # a fixed norm (g = 1) stabilizes training, as in DINO's default for ViTs
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6 if x.dtype == torch.float32 else 1e-4)
        return self.last_layer(x)


CENTERINGS = ("center", "sinkhorn")  # how teacher outputs become targets (DINOLoss.targets)


class DINOLoss(nn.Module):
    """Cross-entropy between centered, sharpened teacher outputs and student outputs.

    teacher_out: (2 * B, K) logits on the global crops, crop-major (crop 0 of every image first).
    student_out: (n_crops * B, K) logits on all crops, crop-major, the 2 global crops first.
    Every (teacher crop, student crop) pair of different crops is one term; their mean is the loss.
    centering "center" (DINO): the teacher's logits minus a running mean of them (all-reduced over
    ranks), softmax at the teacher temperature. "sinkhorn" (DINOv2, protloc.dinov2.sinkhorn_knopp):
    Sinkhorn-Knopp over the batch of all ranks; the center is then neither used nor updated (as in
    DINOv2), and checkpoints keep it as it was.
    """

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9, centering="center"):
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"unknown centering {centering!r}; choose from {', '.join(CENTERINGS)}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))

    def targets(self, teacher_out, teacher_temp):
        """Teacher logits (n, K) -> target probabilities (n, K), without gradient."""
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(teacher_out, teacher_temp)
        return F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1).detach()

    def forward(self, student_out, teacher_out, n_crops, teacher_temp):
        logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1).unflatten(0, (n_crops, -1))  # (n, B, K)
        targets = self.targets(teacher_out, teacher_temp).chunk(2)  # (B, K) each
        # sum over the pairs (t, s != t) of q_t . logp_s = sum over t of q_t . (sum_s logp_s - logp_t):
        # two products over (B, K) instead of one per pair (18 at DINO's 2 + 8 crops)
        all_logp = logp.sum(0)  # (B, K)
        total = sum(torch.sum(-q * (all_logp - logp[t]), dim=-1).mean() for t, q in enumerate(targets))
        terms = len(targets) * (n_crops - 1)  # a crop is not its own target
        if self.centering == "center":
            self.update_center(teacher_out)
        return total / terms, targets

    @torch.no_grad()
    def update_center(self, teacher_out):
        batch_sum = teacher_out.float().sum(dim=0, keepdim=True)
        count = torch.tensor(float(teacher_out.shape[0]), device=teacher_out.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)


class iBOTPatchLoss(DINOLoss):  # DINOv2's name
    """iBOT's masked-patch loss (Zhou et al. 2022), as DINOv2's `iBOTPatchLoss.forward_masked`.

    student_out: (M, K) the student's logits on the M masked patch tokens of the global crops.
    teacher_out: (M, K) the teacher's logits on the same tokens of the unmasked crops.
    patch_mask: (n, T) bool, which patch tokens of the n global crops those M rows are (row-major).
    The loss is the cross-entropy of each masked token, averaged within its crop, summed over the
    crops and divided by n (crops without masked tokens count as 0). Targets as DINOLoss's, with a
    center of their own (DINOv2 keeps one per loss): the running mean of the teacher's masked-token
    logits, or Sinkhorn-Knopp over the masked tokens of all ranks."""

    def forward(self, student_out, teacher_out, patch_mask, teacher_temp):
        targets = self.targets(teacher_out, teacher_temp)  # (M, K)
        logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1)  # (M, K)
        per_crop = patch_mask.sum(dim=1, keepdim=True).clamp(min=1)  # (n, 1)
        weights = (1.0 / per_crop).expand_as(patch_mask)[patch_mask]  # (M,): 1 / masked tokens of its crop
        loss = (torch.sum(-targets * logp, dim=-1) * weights).sum() / patch_mask.shape[0]
        if self.centering == "center":
            self.update_center(teacher_out)
        return loss, targets


def entropy(probs: torch.Tensor) -> float:
    """Mean entropy (nats) of rows of probabilities; near 0 or near log(K) means collapse."""
    return float(-(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean())


def cosine_schedule(base, final, total_steps, warmup_steps=0, warmup_start=0.0) -> np.ndarray:
    """Per-step values: linear warm-up from warmup_start to base, then cosine from base to final."""
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=False)
    steps = np.arange(total_steps - warmup_steps)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine])


def teacher_temp_schedule(warmup_temp, temp, warmup_steps, total_steps) -> np.ndarray:
    """Linear warm-up of the teacher temperature, then constant (DINO's schedule)."""
    warmup_steps = min(warmup_steps, total_steps)
    return np.concatenate([np.linspace(warmup_temp, temp, warmup_steps), np.full(total_steps - warmup_steps, temp)])


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on weight matrices only: biases and norm parameters (1-D) are not regularized."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict]) -> torch.optim.AdamW:
    """AdamW (torch's defaults, as DINO's) over param_groups; fused: one pass over each parameter's
    state instead of a kernel per operation, 5x faster than the loop torch takes on CPUs by default
    (44 M parameters of ViT-S + DINO head, README, Speed)."""
    return torch.optim.AdamW(groups, fused=True)


def clip_gradients(model: nn.Module, clip: float) -> None:
    """Clip each parameter's gradient norm to `clip` separately, as the DINO reference does;
    clip 0 means no clipping (DINO's `--clip_grad 0`)."""
    if clip == 0:
        return
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    # one multi-tensor pass for the norms and one for the scaling instead of two kernels per parameter
    norms = torch.stack(torch._foreach_norm(grads, 2))  # (n_params,)
    torch._foreach_mul_(grads, torch.clamp(clip / (norms + 1e-6), max=1.0).unbind())


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, as teacher + (1 - momentum) * (student - teacher):
    one multi-tensor pass over the parameters."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t_params, s_params, 1 - momentum)


def collapse_warning(teacher_entropy: float, out_dim: int) -> str | None:
    """A description of a collapsing teacher, or None: its output entropy near 0 (one dimension
    dominates) or near log(out_dim) (uniform outputs)."""
    top = math.log(out_dim)
    if teacher_entropy < 0.02 * top:
        return f"teacher output entropy {teacher_entropy:.3f} is near 0: outputs collapse to one dimension"
    if teacher_entropy > 0.98 * top:
        return f"teacher output entropy {teacher_entropy:.3f} is near log(out_dim) = {top:.3f}: outputs are uniform"
    return None


PACKS = ("auto", "on", "off")  # whether DINOModel packs all crops into one transformer pass (`packed`)


def packed(setting: str, device: torch.device) -> bool:
    """Whether to pack the crops (DINOModel's `pack`) under setting auto|on|off on `device`. auto packs
    where attention runs on the Triton varlen kernel (protloc.kernels: CUDA, or PROTLOC_BACKEND=triton),
    which attends over the whole pack in one launch. The torch path attends per run of equal-length
    crops either way, so on it packing only adds the copies into and out of the pack: ViT-S/16 DINO
    step on a 2-core CPU 7.06 s packed against 5.82 s per crop size (README, Speed)."""
    if setting not in PACKS:
        raise ValueError(f"unknown pack setting {setting!r}; choose from {', '.join(PACKS)}")
    if setting != "auto":
        return setting == "on"
    return kernels.backend("attention", torch.empty(0, device=device)) == "triton"


class DINOOutputs(NamedTuple):
    logits: torch.Tensor  # (sum n_i, out_dim): the head on every crop's CLS token, in the crops' order
    cls: torch.Tensor  # (n_0, D): the backbone's CLS tokens of crops[0], the global crops (KoLeo's input)
    patch_logits: torch.Tensor | None  # (M, out_dim): the head on the M masked patch tokens of crops[0] (iBOT)
    patch_mask: torch.Tensor | None  # (n_0, T) bool: which patch tokens of crops[0] those M rows are, row-major


class DINOModel(nn.Module):
    """Backbone + head applied to the crops of a batch.

    crops: a list of (n_i, C, S_i, S_i) tensors of already normalized crops, one per crop size
    (DINO: the 2B global crops, then the NB local crops, each crop-major). With `pack`, the
    tokens of all crops run through the transformer in one pass (attention stays within each
    crop); without, one pass per crop size, as the DINO reference does. Same result either way.

    masks (iBOT): (n_0, N) bool over the patch grid of crops[0], or None. The patch tokens at
    masked positions (every channel's token there, in the channel layout) go through the head too,
    in the same call as the CLS tokens: one head shared by CLS and patch tokens, as iBOT's
    `--shared_head true` and DINOv2's default `ibot.separate_head: false`. With `mask_input`
    (the student) those patches enter the backbone as its mask token; without (the teacher) as
    they are.
    """

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops, channel_names=None, pack=True, masks=None, mask_input=True) -> DINOOutputs:
        tokens = []
        for i, c in enumerate(crops):
            mask = masks if i == 0 and mask_input else None
            tokens.append(self.backbone.tokens(c, *no_scaling(c), channel_names, mask))
        if pack:
            outs = self.backbone.forward_pack(tokens)
        else:
            outs = [self.backbone.forward_pack([t])[0] for t in tokens]
        rows = [o[:, 0] for o in outs]  # CLS token of every crop
        n_cls = sum(len(r) for r in rows)
        if masks is None:
            return DINOOutputs(self.head(torch.cat(rows)), outs[0][:, 0], None, None)
        patch_mask = self.backbone.token_mask(masks, crops[0].shape[1])  # (n_0, T)
        logits = self.head(torch.cat(rows + [outs[0][:, 1:][patch_mask]]))
        return DINOOutputs(logits[:n_cls], outs[0][:, 0], logits[n_cls:], patch_mask)
