"""Memory at scale: `protloc embed` over 2,000 and 20,000 images, `protloc knn` on 100,000 rows.

    python benchmarks/bench_scale.py [--images 2000,20000] [--knn-rows 100000] [--out FILE]

embed: 2,000 synthetic 64 x 64 fields, listed under N distinct paths (hard links, so 20,000
paths cost no disk), embedded by a small random ViT (vit_tiny/16, 2 blocks, 64 px) with 2 loader
workers; rows stream into the .npz as they are computed. Peak resident memory of the protloc
process and of its largest loader worker (getrusage of the children), and the time.

knn: N x 384 float32 embeddings of 20 noisy clusters with labels, 5-fold cross-validated k-NN
(k = 10, 20) through `protloc knn`; the similarity is computed 1,024 queries at a time, so memory
stays O(1,024 x N), not N x N. Peak resident memory and time.

Flat memory is the claim: peak RSS at 20,000 images should be within a few MB of that at 2,000.
"""

import argparse
import csv
import os
import platform
import resource
import subprocess
import sys
import tempfile

import numpy as np

from protloc.synth import write_dataset


def run_measured(args):
    """Run a command in a fresh process; (seconds, peak RSS of it in MB, stderr tail)."""
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="2000,20000")
    ap.add_argument("--knn-rows", type=int, default=100000)
    ap.add_argument("--out")
    args = ap.parse_args()
    lines = [f"# protloc at scale: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
             f"{'job':<40} {'seconds':>8} {'peak RSS MB':>12}"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base")
        write_dataset(base, n=2000, size=64, seed=0)
        fields = sorted(f for f in os.listdir(base) if f.endswith(".tif"))
        for n in map(int, args.images.split(",")):
            folder = os.path.join(tmp, f"n{n}")
            os.makedirs(folder)
            for i in range(n):  # distinct paths to the same bytes
                os.link(os.path.join(base, fields[i % len(fields)]), os.path.join(folder, f"f{i:06d}.tif"))
            seconds, rss = run_measured(protloc("embed", folder, "--weights", "random", "--arch", "vit_tiny",
                                                "--depth", "2", "--size", "64", "--workers", "2", "--quiet",
                                                "-o", os.path.join(tmp, f"e{n}.npz")))
            lines.append(f"{f'embed {n:,} images':<40} {seconds:>8.1f} {rss:>12.0f}")
            print(lines[-1], flush=True)

        n = args.knn_rows
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 20, n)
        centers = rng.normal(size=(20, 384)).astype(np.float32)
        x = centers[labels] + 2.0 * rng.normal(size=(n, 384)).astype(np.float32)  # (n, 384)
        ids = np.array([f"cell{i}" for i in range(n)])
        emb = os.path.join(tmp, "knn.npz")
        np.savez(emb, embeddings=x, ids=ids)
        with open(os.path.join(tmp, "knn.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "label"])
            w.writerows(zip(ids, (f"class{c}" for c in labels)))
        del x
        seconds, rss = run_measured(protloc("knn", emb, "--labels", os.path.join(tmp, "knn.csv"), "-k", "10,20"))
        lines.append(f"{f'knn {n:,} x 384, 5 folds, k = 10, 20':<40} {seconds:>8.1f} {rss:>12.0f}")
        print(lines[-1], flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines.append(f"# this script itself peaked at {peak:.0f} MB (data generation)")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
