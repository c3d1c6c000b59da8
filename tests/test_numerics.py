"""Everywhere protloc exponentiates similarities or logits, extreme float32 inputs give finite, right
answers: the k-NN vote, the head's probabilities and losses, predict, the DINO loss, attention maps.

References are computed with plain exp() in arbitrary precision (decimal), so they share no
stabilizing trick with the code under test.
"""

import json
import math
from decimal import Decimal, localcontext

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import f1_score

from protloc.classifier import load_classifier
from protloc.cli import main
from protloc.dino import DINOLoss
from protloc.head import loss_function, probabilities
from protloc.knn import knn_scores

pytestmark = pytest.mark.usefixtures("one_thread")


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def exact_softmax(row, temperature=1.0) -> list[Decimal]:
    """softmax(row / T) with exp() itself, in 60 significant digits (no shift by the maximum)."""
    with localcontext() as ctx:
        ctx.prec = 60
        e = [(Decimal(float(v)) / Decimal(temperature)).exp() for v in row]
        total = sum(e)
        return [v / total for v in e]


def exact_log_softmax(row, temperature=1.0) -> list[Decimal]:
    with localcontext() as ctx:
        ctx.prec = 60
        return [p.ln() for p in exact_softmax(row, temperature)]


# --- the k-NN vote -----------------------------------------------------------------------------------


def close_embeddings(n=60, dim=64, seed=0):
    """n rows of 3 classes whose cosine similarities are all about 0.95-0.98 (a common picture for
    embeddings of one cell type): a shared direction, a small class direction, noise."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=dim)
    base /= np.linalg.norm(base)

    def orthogonal(v):
        v = v - (v @ base)[..., None] * base
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    cls = np.arange(n) % 3
    x = base + 0.06 * orthogonal(rng.normal(size=(3, dim)))[cls] + 0.17 * orthogonal(rng.normal(size=(n, dim)))
    return x.astype(np.float32), cls


def cosine(x):
    xn = np.asarray(x, np.float64) / np.linalg.norm(np.asarray(x, np.float64), axis=1, keepdims=True)
    return xn @ xn.T


def exact_loo_shares(x, cls, k, temperature):
    """Leave-one-out vote shares, each neighbour weighted by exp(sim / T) exactly."""
    sim = cosine(x)
    np.fill_diagonal(sim, -np.inf)
    shares = np.zeros((len(x), cls.max() + 1))
    with localcontext() as ctx:
        ctx.prec = 60
        for i in range(len(x)):
            nearest = np.argsort(-sim[i], kind="stable")[:k]
            weights = [(Decimal(sim[i, j]) / Decimal(temperature)).exp() for j in nearest]
            total = sum(weights)
            for j, w in zip(nearest, weights):
                shares[i, cls[j]] += float(w / total)
    return shares


def test_the_regime_overflows_a_plain_float32_exponential():
    x, _ = close_embeddings()
    sim = cosine(x)[~np.eye(len(x), dtype=bool)]
    assert 0.94 < sim.min() and sim.max() < 0.99
    with np.errstate(over="ignore"):
        assert np.isinf(np.exp(np.float32(sim.max() / 0.01)))  # exp(98) > float32's 3.4e38


@pytest.mark.parametrize("temperature", [1e-6, 1e-3, 0.01, 0.07, 1.0, 1e4])
def test_knn_vote_shares_are_exact_for_any_temperature(temperature):
    x, cls = close_embeddings()
    exclude = np.eye(len(x), dtype=bool)
    got = knn_scores(x, cls, x, [1, 5], temperature, exclude=exclude)
    for k in (1, 5):
        assert np.isfinite(got[k]).all()
        np.testing.assert_allclose(got[k].sum(1), 1, atol=1e-5)
        want = exact_loo_shares(x, cls, k, temperature)
        # float32 similarities differ from float64 ones by ~1e-7, i.e. 1e-7 / T in the exponent
        np.testing.assert_allclose(got[k], want, atol=max(1e-5, 3e-7 / temperature))


def test_a_query_with_no_usable_neighbour_gets_no_vote_not_nan():
    x, cls = close_embeddings(n=6)
    got = knn_scores(x, cls, x[:2], [3], 0.01, exclude=np.ones((2, 6), dtype=bool))[3]
    assert np.array_equal(got, np.zeros((2, 3), np.float32))


def test_knn01_field_case_through_the_cli(tmp_path):
    """The shared case knn01, rebuilt: 60 embeddings with similarities 0.94-0.98, 3 classes,
    `--loo -k 5 --temperature 0.01` (every vote was NaN, every query went to class 0: F1 0.167)."""
    x, cls = close_embeddings()
    names = np.array(["cytosol", "mitochondria", "nucleoplasm"])
    np.save(tmp_path / "emb.npy", x)
    (tmp_path / "ids.txt").write_text("".join(f"cell_{i:03d}\n" for i in range(len(x))))
    (tmp_path / "labels.csv").write_text("id,label\n"
                                         + "".join(f"cell_{i:03d},{names[c]}\n" for i, c in enumerate(cls)))
    for temperature in (0.01, 0.001):
        result = run(["knn", tmp_path / "emb.npy", "--ids", tmp_path / "ids.txt", "--labels", tmp_path / "labels.csv",
                      "--loo", "-k", "5", "--temperature", temperature, "--json", tmp_path / f"{temperature}.json"])
        assert result.exit_code == 0, result.output
        want = f1_score(cls, exact_loo_shares(x, cls, 5, temperature).argmax(1), average="macro")
        assert 0.75 < want < 1.0  # a non-trivial answer, far from the 0.167 of the overflow
        got = json.loads((tmp_path / f"{temperature}.json").read_text())["runs"][0]["results"][0]
        assert got["f1_macro_pooled"] == pytest.approx(want, abs=1e-12)
        assert result.stdout.splitlines()[1].split()[:2] == ["5", f"{want:.3f}"]


@pytest.mark.parametrize("value", ["0", "-0.5", "nan", "inf", "-inf"])
def test_knn_refuses_temperatures_it_cannot_use(tmp_path, value):
    result = run(["knn", tmp_path / "e.npz", "--labels", tmp_path / "l.csv", "--temperature", value])
    assert result.exit_code == 2 and "--temperature" in result.stderr


# --- heads: probabilities, losses, predict -----------------------------------------------------------


EXTREME_LOGITS = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4 + 1, -1e4 + 3], [500.0, -500.0, 499.0],
                           [3e4, 3e4, -3e4], [0.1, 0.2, 0.3]], dtype=np.float32)


def test_head_probabilities_of_extreme_logits():
    softmax = probabilities(torch.from_numpy(EXTREME_LOGITS), multilabel=False)
    sigmoid = probabilities(torch.from_numpy(EXTREME_LOGITS), multilabel=True)
    assert np.isfinite(softmax).all() and np.isfinite(sigmoid).all()
    for row, got in zip(EXTREME_LOGITS, softmax):
        np.testing.assert_allclose(got, [float(p) for p in exact_softmax(row)], rtol=1e-6, atol=1e-7)
    for row, got in zip(EXTREME_LOGITS, sigmoid):  # sigmoid(v) = softmax([v, 0])[0]
        np.testing.assert_allclose(got, [float(exact_softmax([v, 0.0])[0]) for v in row], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("balance", ["weight", "none"])
def test_losses_of_extreme_logits(balance):
    y = np.eye(3, dtype=np.uint8)[[0, 1, 2, 2, 0]]
    logits = torch.from_numpy(EXTREME_LOGITS)
    counts = y.sum(0)
    w = len(y) / (3 * counts) if balance == "weight" else np.ones(3)
    target = [0, 2, 1, 1, 0]  # mostly the wrong class: large losses
    got = float(loss_function(y, False, balance)(logits, torch.tensor(target)))
    terms = [-float(exact_log_softmax(row)[t]) for row, t in zip(EXTREME_LOGITS, target)]
    want = sum(w[t] * v for t, v in zip(target, terms)) / sum(w[t] for t in target)
    assert math.isfinite(got) and got == pytest.approx(want, rel=1e-6)

    multi = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=np.uint8)
    got = float(loss_function(multi, True, balance)(logits, torch.from_numpy(multi).float()))
    positives = multi.sum(0)
    pos_weight = (len(multi) - positives) / positives if balance == "weight" else np.ones(3)
    with localcontext() as ctx:
        ctx.prec = 60
        bce = [-(pos_weight[c] * t * float(exact_log_softmax([v, 0.0])[0])
                 + (1 - t) * float(exact_log_softmax([0.0, v])[0]))
               for row, trow in zip(EXTREME_LOGITS, multi) for c, (v, t) in enumerate(zip(row, trow))]
    assert math.isfinite(got) and got == pytest.approx(np.mean(bce), rel=1e-6)


def test_predict_probabilities_of_far_out_embeddings(tmp_path):
    """A head fed embeddings far outside its training range (logits ~1e4 apart) still writes
    finite probabilities that sum to 1, equal to the exact softmax of its logits."""
    rng = np.random.default_rng(0)
    cls = np.arange(40) % 2
    x = (rng.normal(size=(40, 8)) + 3 * cls[:, None]).astype(np.float32)
    ids = [f"r{i}" for i in range(40)]
    np.savez(tmp_path / "e.npz", embeddings=x, ids=np.array(ids), meta=np.array("{}"))
    (tmp_path / "labels.csv").write_text("id,label\n" + "".join(f"r{i},{'ab'[c]}\n" for i, c in enumerate(cls)))
    assert run(["finetune", tmp_path / "e.npz", "--labels", tmp_path / "labels.csv", "--folds", "0", "--epochs", "30",
                "--lr", "0.05", "-o", tmp_path / "m.pt"]).exit_code == 0
    far = (x * 1e4).astype(np.float32)
    np.savez(tmp_path / "far.npz", embeddings=far, ids=np.array(ids), meta=np.array("{}"))
    result = run(["predict", tmp_path / "far.npz", "--weights", tmp_path / "m.pt"])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.strip().splitlines()[1:]]
    probs = np.array([[float(v) for v in r[2:]] for r in rows])
    head = load_classifier(tmp_path / "m.pt").head
    with torch.no_grad():
        logits = head(torch.from_numpy(far)).numpy()
    assert np.abs(logits[:, 0] - logits[:, 1]).max() > 1e3  # the regime this test is about
    np.testing.assert_allclose(probs, [[float(p) for p in exact_softmax(row)] for row in logits], atol=1e-6)
    assert [r[1] for r in rows] == ["ab"[j] for j in logits.argmax(1)]


# --- the DINO loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e4])
def test_dino_loss_of_extreme_outputs(scale):
    """Teacher softmax at 0.04 with centering, student log-softmax at 0.1, outputs up to 1e4
    apart: the loss equals its exact value, and the center moves as a running mean."""
    torch.manual_seed(0)
    batch, crops, dim, teacher_temp = 2, 4, 6, 0.04
    student = (torch.randn(crops * batch, dim) * scale).float()
    teacher = (torch.randn(2 * batch, dim) * scale).float()
    loss_fn = DINOLoss(dim)
    loss_fn.center.copy_(torch.randn(1, dim) * scale / 10)
    center = loss_fn.center.double().numpy()[0]
    got, _ = loss_fn(student, teacher, crops, teacher_temp)
    assert torch.isfinite(got)
    terms = []
    for t in range(2):
        for s in range(crops):
            if s == t:
                continue
            for b in range(batch):
                q = exact_softmax(teacher[t * batch + b].double().numpy() - center, teacher_temp)
                logp = exact_log_softmax(student[s * batch + b].double().numpy(), 0.1)
                terms.append(-float(sum(qi * li for qi, li in zip(q, logp))) / batch)
    want = sum(terms) / (2 * (crops - 1))
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(loss_fn.center.double().numpy()[0],
                               0.9 * center + 0.1 * teacher.double().mean(0).numpy(), rtol=1e-5, atol=1e-5 * scale)


# --- attention maps ----------------------------------------------------------------------------------


def test_cls_attention_with_logits_thousands_apart():
    from protloc.attention_maps import cls_attention
    from protloc.model import ViTConfig, VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(arch="vit_tiny", patch=8, depth=2, img_size=32,
                                        channels=["nucleus", "protein"]))
    last = model.blocks[-1].attn
    with torch.no_grad():
        last.qkv.weight.mul_(300.0)  # attention logits of the last block ~1e3-1e4 apart
    pixels = torch.rand(1, 2, 32, 32)
    ones, zeros = torch.ones(1, 2), torch.zeros(1, 2)
    got = cls_attention(model, pixels, ones, zeros).double().numpy()[0]  # (heads, 16 patches)
    assert np.isfinite(got).all()

    # the reference: the same network in float64 up to the last block's logits, then exact softmax
    model = model.double().eval()
    with torch.no_grad():
        tokens = model.tokens(pixels.double(), ones.double(), zeros.double(), None)
        B, L, D = tokens.shape
        x = tokens.reshape(B * L, D)
        cu = torch.tensor([0, L], dtype=torch.int32)
        for block in model.blocks[:-1]:
            x = block(x, cu, L)
        heads = last.heads
        qkv = last.qkv(model.blocks[-1].norm1(x)).view(L, 3, heads, D // heads)
        logits = torch.einsum("hd,lhd->hl", qkv[0, 0], qkv[:, 1]) / math.sqrt(D // heads)
    spread = logits.max(1).values - logits.min(1).values
    assert spread.min() > 1e3
    want = np.array([[float(p) for p in exact_softmax(row)][1:] for row in logits.numpy()])
    np.testing.assert_allclose(got, want, atol=1e-3)  # float32 logits of ~1e4 carry ~1e-3 of rounding
