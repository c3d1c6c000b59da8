"""DINOv2 / iBOT ingredients added to the DINO objective, each behind a pretrain flag (off by default).

- KoLeo (`--koleo W`): the Kozachenko-Leonenko entropy estimator as a regularizer (Sablayrolles et
  al. 2019, "Spreading vectors for similarity search"), as DINOv2 applies it (Oquab et al. 2023,
  facebookresearch/dinov2 `dinov2/loss/koleo_loss.py`): it pushes every student CLS feature of a
  batch away from its nearest neighbour, so the features spread over the sphere.
- Sinkhorn-Knopp centering (`--centering sinkhorn`): teacher targets that give every prototype an
  equal share of the batch (SwAV, Caron et al. 2020), as DINOv2's `sinkhorn_knopp_teacher`.
- Block masks for iBOT's masked-patch loss (`--ibot W`; Zhou et al. 2022): BEiT's block-wise
  masking as DINOv2's `MaskingGenerator` and `collate_data_and_cast` draw it.

The losses that keep a center (DINO's and iBOT's) live in protloc.dino; the masked tokens are
replaced in protloc.model.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regularizer: -mean_i log(min_{j != i} ||x_i - x_j|| + eps) over L2-normalized rows.

    features: (n, D), any float dtype; computed in float32 without autocast (as DINOv2).
    Returns a scalar; 0 when n < 2 (no other sample to be near). DINOv2 computes it on each
    process's batch, per global crop, with weight 0.1 (`dino.koleo_loss_weight`); so does protloc.
    The distance is torch's pairwise_distance (||x_i - x_j + eps||, DINOv2's nn.PairwiseDistance),
    which keeps the gradient finite when two rows coincide."""
    if features.shape[0] < 2:
        return features.new_zeros((), dtype=torch.float32)
    with torch.autocast(features.device.type, enabled=False):
        x = F.normalize(features.float(), p=2, dim=-1, eps=eps)  # (n, D)
        dots = x @ x.t()  # (n, n): for unit vectors the largest dot product is the nearest neighbour
        dots.fill_diagonal_(-2.0)  # below any dot product of unit vectors: a row is not its own neighbour
        nearest = dots.argmax(dim=1)  # (n,)
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)  # (n,)
        return -torch.log(distances + eps).mean()


@torch.no_grad()
def sinkhorn_knopp(teacher_out: torch.Tensor, teacher_temp: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp: logits (n, K) -> probabilities (n, K), each row summing to 1.

    Q = exp(logits / teacher_temp) over the B samples of all processes (K x B), normalized to sum 1,
    then `iterations` times: each prototype's row scaled to sum 1/K, each sample's column to 1/B;
    finally columns x B. After enough iterations every prototype holds B/K of the targets' mass
    (the transport polytope of SwAV, Caron et al. 2020). DINOv2's `sinkhorn_knopp_teacher`
    (3 iterations); row sums and totals are all-reduced over processes, and B is the number of
    rows of all processes (so a process may hold a different number, as iBOT's masked patches do).

    Two guards that leave ordinary results unchanged: each prototype's largest logit over all
    processes is subtracted before exp, which the first row normalization cancels exactly but keeps
    exp from overflowing at small temperatures; and a sample whose every entry underflowed gets an
    all-zero target (it then weighs nothing) instead of 0 / 0 = NaN."""
    logits = teacher_out.float() / teacher_temp  # (n, K)
    shift = logits.amax(dim=0)  # (K,)
    n_samples = torch.tensor(float(logits.shape[0]), device=logits.device)
    if _distributed():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
        dist.all_reduce(n_samples)
    q = torch.exp(logits - shift).t()  # (K, n)
    K, B = q.shape[0], n_samples
    total = q.sum()
    if _distributed():
        dist.all_reduce(total)
    q /= total
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)  # (K, 1): every prototype gets 1/K of the mass
        if _distributed():
            dist.all_reduce(rows)
        q /= rows
        q /= K
        q /= q.sum(dim=0, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)  # every sample 1/B
        q /= B
    q *= B  # each sample's column sums to 1: a distribution over the prototypes
    return q.t()


def block_mask(height: int, width: int, n_masked: int, rng: np.random.Generator, min_block: int = 4,
               max_block: int | None = None, aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> np.ndarray:
    """A (height, width) bool mask of a patch grid with exactly `n_masked` patches True, in blocks.

    BEiT's block-wise masking as DINOv2's `MaskingGenerator` (`dinov2/data/masking.py`): blocks of
    min_block to max_block patches (DINOv2: 4 to half the grid), aspect ratio log-uniform in
    `aspect`, each adding new patches without going past the target; 10 failed tries in a row end
    the blocks. DINOv2 then stops short of the target; here the remaining patches are drawn
    uniformly among the unmasked ones, so every mask holds exactly the count asked for."""
    n_patches = height * width
    if not 0 <= n_masked <= n_patches:
        raise ValueError(f"cannot mask {n_masked} of {n_patches} patches")
    max_block = n_patches // 2 if max_block is None else max_block
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    mask = np.zeros((height, width), dtype=bool)
    count = 0
    while count < n_masked:
        room = min(n_masked - count, max_block)
        added = 0
        for _ in range(10):
            area = rng.uniform(*sorted((min_block, room)))  # DINOv2's random.uniform(min_block, room)
            ratio = math.exp(rng.uniform(*log_aspect))
            h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if not (h < height and w < width):
                continue
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            block = mask[top:top + h, left:left + w]
            new = h * w - int(block.sum())
            if 0 < new <= room:
                block[...] = True
                added = new
                break
        if added == 0:
            break
        count += added
    if count < n_masked:  # the blocks stopped short: the rest at random
        free = np.flatnonzero(~mask.ravel())
        mask.ravel()[rng.choice(free, n_masked - count, replace=False)] = True
    return mask


def sample_masks(n_crops: int, height: int, width: int, ratio: tuple[float, float], prob: float,
                 rng: np.random.Generator) -> np.ndarray:
    """iBOT masks of a step's global crops: (n_crops, height * width) bool, True = masked patch.

    As DINOv2's `collate_data_and_cast`: int(n_crops * prob) of the crops are masked (here at least
    one), their mask ratios spread evenly over `ratio` (masked crop i draws its ratio uniformly
    from the i-th of as many equal parts of [low, high]), each holding int(ratio * patches) patches
    (here at least one) in blocks (block_mask); the others are not masked; the crops are shuffled.
    The at-least-ones keep the iBOT loss defined when a step has few images or few patches."""
    n_patches = height * width
    n_masked = max(1, int(n_crops * prob))
    edges = np.linspace(ratio[0], ratio[1], n_masked + 1)
    masks = np.zeros((n_crops, height, width), dtype=bool)
    for i in range(n_masked):
        count = max(1, int(n_patches * rng.uniform(edges[i], edges[i + 1])))
        masks[i] = block_mask(height, width, count, rng)
    return masks[rng.permutation(n_crops)].reshape(n_crops, n_patches)
