"""Memory at scale: `protloc embed` over 2,000 and 20,000 images; a killed and resumed embed and a
sharded one merged; k-NN over 100,000 and 1,000,000 rows.

    python benchmarks/bench_scale.py [--images 2000,20000] [--resume-images 100000] [--shards 10]
                                     [--knn-rows 100000,1000000] [--out FILE]

embed: 2,000 synthetic 64 x 64 fields, listed under N distinct paths (hard links, so 20,000
paths cost no disk), embedded by a small random ViT (vit_tiny/16, 2 blocks, 64 px) with 2 loader
workers; rows stream into the .npz as they are computed. Peak resident memory of the protloc
process and of its largest loader worker (getrusage of the children), and the time.
Flat memory is the claim: peak RSS at 20,000 images should be within a few MB of that at 2,000.

resume: --resume-images paths embedded uninterrupted, then with --resume killed (SIGKILL to its
process group) once half of its chunks are committed and started again: total time of the two runs
against the uninterrupted one, the main process's peak RSS, and whether the outputs are equal. Then
the same paths as --shards parts embedded one after another and `protloc merge`d.

knn: N x 384 float32 embeddings of 20 noisy clusters (a row is its class centre plus twice as much
Gaussian noise: the classes are learnable, the exact neighbours within a class are nearly
arbitrary, the hard case for an approximate index), 5 folds (protloc.folds.splits, seed 0), k = 10
and 20, T = 0.07: the calls of `protloc knn` (read_embeddings, nearest, vote) in a fresh process
per index, its peak RSS and time (labels come as an .npy, so the CSV matching is not in the time).
Up to --full-max rows every test row is searched; above it, a fixed sample of --sample test rows
per fold, and the search time is scaled by test rows / sample (marked "scaled"; loading, copies
and faiss's index build are measured whole). faiss: one index per fold, searched with each
--nprobe. Recall@k: the share of exact's k neighbours that faiss found, over the same queries;
dF1: faiss's pooled macro F1 minus exact's on those queries. The float32 matrix-product rate of
the exact path's blocks (4,096 x 384 @ 384 x 8,192) is measured before and after, and the exact
search's rate (2 x queries x training rows x 384 / search seconds) is given as a share of it.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from sklearn.metrics import f1_score

from protloc.embeddings import read_embeddings
from protloc.folds import splits
from protloc.knn import vote
from protloc.neighbours import Q_BLOCK, T_BLOCK, Search, faiss_index, faiss_search, nearest, nlist
from protloc.synth import write_dataset

KS = (10, 20)
NOISE = 4.0  # per dimension, class centres 1: cosines within a class ~0.06 +- 0.05, between ~0 +- 0.05


def run_measured(args):
    """Run a command in a fresh process; (seconds, peak RSS of it in MB)."""
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
            "r = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "print(time.perf_counter() - t, r.ru_maxrss / 1024, p.returncode); sys.stderr.write(p.stderr[-2000:])")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    seconds, rss_mb, rc = proc.stdout.split()
    if int(rc) != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(args)}\n{proc.stderr}")
    return float(seconds), float(rss_mb)


def protloc(*args):
    return [sys.executable, "-m", "protloc", *map(str, args)]


EMBED = ["--weights", "random", "--arch", "vit_tiny", "--depth", "2", "--size", "64", "--workers", "2", "--quiet"]


def linked_folder(base: str, fields: list[str], folder: str, n: int) -> str:
    """n distinct paths (hard links) to the fields of `base`, in `folder`."""
    os.makedirs(folder)
    for i in range(n):
        os.link(os.path.join(base, fields[i % len(fields)]), os.path.join(folder, f"f{i:06d}.tif"))
    return folder


def killed_and_resumed(folder: str, out: str, fraction: float = 0.5):
    """Run `embed --resume`, SIGKILL its process group once `fraction` of the chunks are committed,
    then run it again to the end. (total seconds, peak RSS MB of the two runs' main process, chunks
    at the kill)."""
    args = protloc("embed", folder, *EMBED, "--resume", "-o", out)
    chunks = -(-len(os.listdir(folder)) // 1024)  # embed's default --chunk-images
    work = out + ".protloc-work"
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first_rss = 0.0
    while proc.poll() is None:
        done = len([f for f in os.listdir(work) if f.startswith("chunk-")]) if os.path.isdir(work) else 0
        with open(f"/proc/{proc.pid}/status") as f:  # the main process's peak so far
            first_rss = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
        if done >= fraction * chunks:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    first_s = time.perf_counter() - start
    if proc.returncode != -signal.SIGKILL:
        raise SystemExit("the run ended before the kill")
    second_s, second_rss = run_measured(args)
    return first_s + second_s, max(first_rss, second_rss), done


def resume_lines(base: str, fields: list[str], tmp: str, n: int, parts: int) -> list[str]:
    """Rows: n images embedded uninterrupted; with --resume, killed half-way and resumed; as `parts`
    --shard parts one after another, then merged."""
    folder = linked_folder(base, fields, os.path.join(tmp, "resume"), n)
    plain_s, plain_rss = run_measured(protloc("embed", folder, *EMBED, "-o", os.path.join(tmp, "plain.npz")))
    lines = [f"{f'embed {n:,} images, uninterrupted':<40} {plain_s:>8.1f} {plain_rss:>12.0f}"]
    total_s, rss, chunks = killed_and_resumed(folder, os.path.join(tmp, "resumed.npz"))
    lines.append(f"{f'  --resume, SIGKILL at chunk {chunks}, resumed':<40} {total_s:>8.1f} {rss:>12.0f}"
                 f"   {total_s / plain_s:.2f}x the uninterrupted time")
    with np.load(os.path.join(tmp, "plain.npz")) as a, np.load(os.path.join(tmp, "resumed.npz")) as b:
        same = np.array_equal(a["embeddings"], b["embeddings"]) and np.array_equal(a["ids"], b["ids"])
    lines.append(f"#   resumed output equals the uninterrupted one bit for bit: {same}")
    outs = [os.path.join(tmp, f"part{i}.npz") for i in range(1, parts + 1)]
    embed_s = sum(run_measured(protloc("embed", folder, *EMBED, "--shard", f"{i}/{parts}", "-o", out))[0]
                  for i, out in enumerate(outs, start=1))
    merge_s, merge_rss = run_measured(protloc("merge", *reversed(outs), "-o", os.path.join(tmp, "merged.npz")))
    lines.append(f"{f'  as {parts} --shard parts, one by one':<40} {embed_s:>8.1f} {'':>12}")
    lines.append(f"{f'  protloc merge of the {parts} parts':<40} {merge_s:>8.1f} {merge_rss:>12.0f}")
    shutil.rmtree(folder)
    return lines


def matmul_rate(seconds=5.0) -> float:
    """float32 GFLOP/s of the exact search's block product, on this machine now."""
    a, b = torch.randn(Q_BLOCK, 384), torch.randn(T_BLOCK, 384)
    out = a @ b.T
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        torch.mm(a, b.T, out=out)
        n += 1
    return 2 * Q_BLOCK * T_BLOCK * 384 * n / (time.perf_counter() - start) / 1e9


def knn_data(n, folder):
    """N x 384 embeddings of 20 noisy clusters, written as protloc knn reads them (.npz with ids)
    with their class indices beside (.npy). Generated in slices, float32 throughout."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 20, n)
    centers = rng.normal(size=(20, 384)).astype(np.float32)
    x = np.empty((n, 384), np.float32)
    for s in range(0, n, 65536):
        noise = rng.standard_normal((min(65536, n - s), 384), dtype=np.float32)
        x[s:s + 65536] = centers[labels[s:s + 65536]] + NOISE * noise
    emb, lab = os.path.join(folder, f"knn{n}.npz"), os.path.join(folder, f"knn{n}.npy")
    np.savez(emb, embeddings=x, ids=np.char.add("cell", np.arange(n).astype(str)))
    np.save(lab, labels)
    return emb, lab


def knn_job(emb, labels, index, sample, nprobes, out):
    """One index over all folds, in this process (run by run_measured): per fold the test rows
    (or a fixed sample of them), their neighbours and predictions, and the seconds of each step."""
    start = time.perf_counter()
    x = read_embeddings(emb, need_ids=True).x
    y = np.eye(20, dtype=np.uint8)[np.load(labels)]
    record = {"load_s": time.perf_counter() - start, "folds": []}
    rows, preds, queried = {}, {}, []
    for fold, (train, test) in enumerate(splits(y, None, 5, 0, False)):
        queries = test if not sample or sample >= len(test) else np.sort(
            np.random.default_rng(fold).choice(test, sample, replace=False))
        t = time.perf_counter()
        train_x, query_x = x[train], x[queries]  # the copies cross_validate makes
        step = {"test": len(test), "queries": len(queries), "train": len(train), "copy_s": time.perf_counter() - t}
        found, built = {}, None
        if index == "exact":
            t = time.perf_counter()
            found["exact"] = nearest(train_x, query_x, max(KS))
            step["search_s"] = {"exact": time.perf_counter() - t}
        else:
            t = time.perf_counter()
            built = faiss_index(train_x, Search("faiss"))
            step["build_s"], step["search_s"], step["nlist"] = time.perf_counter() - t, {}, nlist(len(train))
            for nprobe in nprobes:
                t = time.perf_counter()
                found[f"faiss{nprobe}"] = faiss_search(built, query_x, max(KS), nprobe)
                step["search_s"][f"faiss{nprobe}"] = time.perf_counter() - t
        step["vote_s"] = {}
        for name, (sim, row) in found.items():
            t = time.perf_counter()
            scores = vote(sim, row, y[train], KS)
            step["vote_s"][name] = time.perf_counter() - t
            rows.setdefault(name, []).append(train[row.numpy()])
            preds.setdefault(name, []).append(np.stack([scores[k].argmax(1) for k in KS], 1))
        queried.append(queries)
        record["folds"].append(step)
        del train_x, query_x, found, built  # as in cross_validate, nothing of a fold outlives it
    np.savez(out, queries=np.concatenate(queried), **{f"rows_{name}": np.concatenate(v) for name, v in rows.items()},
             **{f"pred_{name}": np.concatenate(v) for name, v in preds.items()})
    with open(out + ".json", "w") as f:
        json.dump(record, f)


def total_seconds(record, name):
    """A job's seconds for one index: loading, copies and builds as measured, each fold's search
    and vote scaled from its queries to all its test rows."""
    return record["load_s"] + sum(
        f["copy_s"] + f.get("build_s", 0) + (f["search_s"][name] + f["vote_s"][name]) * f["test"] / f["queries"]
        for f in record["folds"])


def knn_lines(n, tmp, sample, nprobes, rate):
    """The table lines of k-NN over n rows: exact, then faiss at each nprobe."""
    emb, lab = knn_data(n, tmp)
    jobs = {}
    for index in ("exact", "faiss"):
        out = os.path.join(tmp, f"{index}{n}")
        _, rss = run_measured([sys.executable, __file__, "--job", emb, lab, index, str(sample),
                               ",".join(map(str, nprobes)), out])
        with open(out + ".json") as f:
            jobs[index] = (json.load(f), np.load(out + ".npz"), rss)
    record, exact, rss = jobs["exact"]
    truth = np.load(lab)[exact["queries"]]
    scaled = " (scaled)" if any(f["queries"] < f["test"] for f in record["folds"]) else ""
    searched = sum(f["search_s"]["exact"] * f["test"] / f["queries"] for f in record["folds"])
    gflops = sum(2 * f["test"] * f["train"] * 384 for f in record["folds"]) / searched / 1e9
    f1 = {k: f1_score(truth, exact["pred_exact"][:, i], average="macro") for i, k in enumerate(KS)}
    lines = [f"{f'knn {n:,} x 384 exact{scaled}':<40} {total_seconds(record, 'exact'):>8.0f} {rss:>12.0f}   "
             f"macro F1 k=10 {f1[10]:.3f}, k=20 {f1[20]:.3f}; search {gflops:.0f} GFLOP/s, "
             f"{gflops / rate:.0%} of the product's {rate:.0f}"]
    record, approx, rss = jobs["faiss"]
    assert np.array_equal(approx["queries"], exact["queries"])
    for nprobe in nprobes:
        name = f"faiss{nprobe}"
        recall = {k: np.mean([len(np.intersect1d(a[:k], e[:k])) / k
                              for a, e in zip(approx[f"rows_{name}"], exact["rows_exact"])]) for k in KS}
        df1 = {k: f1_score(truth, approx[f"pred_{name}"][:, i], average="macro") - f1[k] for i, k in enumerate(KS)}
        lines.append(f"{f'knn {n:,} faiss nprobe {nprobe}{scaled}':<40} {total_seconds(record, name):>8.0f} "
                     f"{rss:>12.0f}   recall@10 {recall[10]:.3f}, @20 {recall[20]:.3f}; dF1 k=10 {df1[10]:+.3f}, "
                     f"k=20 {df1[20]:+.3f}; nlist {record['folds'][0]['nlist']}, "
                     f"index builds {sum(f['build_s'] for f in record['folds']):.0f} s")
    return lines


def main():
    if sys.argv[1:2] == ["--job"]:
        emb, lab, index, sample, nprobes, out = sys.argv[2:]
        return knn_job(emb, lab, index, int(sample), [int(p) for p in nprobes.split(",")], out)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="2000,20000", help="image counts to embed ('' for none)")
    ap.add_argument("--resume-images", type=int, default=100000,
                    help="images for the kill-and-resume and the shard-and-merge rows (0: none)")
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--knn-rows", default="100000,1000000", help="k-NN row counts ('' for none)")
    ap.add_argument("--full-max", type=int, default=200000, help="up to this many rows, every test row is searched")
    ap.add_argument("--sample", type=int, default=2000, help="above --full-max: test rows searched per fold")
    ap.add_argument("--nprobe", default="16,64", help="faiss lists searched per query, one row each")
    ap.add_argument("--out")
    args = ap.parse_args()
    lines = [f"# protloc at scale: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f} at the start",
             f"{'job':<40} {'seconds':>8} {'peak RSS MB':>12}"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        images = [int(n) for n in args.images.split(",") if n]
        if images or args.resume_images:
            base = os.path.join(tmp, "base")
            write_dataset(base, n=2000, size=64, seed=0)
            fields = sorted(f for f in os.listdir(base) if f.endswith(".tif"))
        for n in images:
            folder = os.path.join(tmp, f"n{n}")
            os.makedirs(folder)
            for i in range(n):  # distinct paths to the same bytes
                os.link(os.path.join(base, fields[i % len(fields)]), os.path.join(folder, f"f{i:06d}.tif"))
            seconds, rss = run_measured(protloc("embed", folder, "--weights", "random", "--arch", "vit_tiny",
                                                "--depth", "2", "--size", "64", "--workers", "2", "--quiet",
                                                "-o", os.path.join(tmp, f"e{n}.npz")))
            lines.append(f"{f'embed {n:,} images':<40} {seconds:>8.1f} {rss:>12.0f}")
            print(lines[-1], flush=True)
            shutil.rmtree(folder)
        if args.resume_images:
            rows = resume_lines(base, fields, tmp, args.resume_images, args.shards)
            lines += rows
            print("\n".join(rows), flush=True)
        nprobes = [int(p) for p in args.nprobe.split(",")]
        for n in (int(n) for n in args.knn_rows.split(",") if n):
            rate = matmul_rate()
            rows = knn_lines(n, tmp, 0 if n <= args.full_max else args.sample, nprobes, rate)
            lines.append(f"# k-NN {n:,}: float32 block product {rate:.0f} GFLOP/s before, {matmul_rate():.0f} after; "
                         f"load average {os.getloadavg()[0]:.1f}")
            lines += rows
            print("\n".join(lines[-len(rows) - 1:]), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines.append(f"# this script itself peaked at {peak:.0f} MB (data generation)")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
