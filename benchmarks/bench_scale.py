"""Memory at scale: `protloc embed` over 2,000 and 20,000 images, a killed and resumed embed and a
sharded one merged over 100,000, `protloc knn` on 100,000 rows.

    python benchmarks/bench_scale.py [--images 2000,20000] [--resume-images 100000] [--shards 10]
                                     [--knn-rows 100000] [--out FILE]

embed: 2,000 synthetic 64 x 64 fields, listed under N distinct paths (hard links, so 20,000
paths cost no disk), embedded by a small random ViT (vit_tiny/16, 2 blocks, 64 px) with 2 loader
workers; rows stream into the .npz as they are computed. Peak resident memory of the protloc
process and of its largest loader worker (getrusage of the children), and the time.

knn: N x 384 float32 embeddings of 20 noisy clusters with labels, 5-fold cross-validated k-NN
(k = 10, 20) through `protloc knn`; the similarity is computed 1,024 queries at a time, so memory
stays O(1,024 x N), not N x N. Peak resident memory and time.

resume: the same embed of --resume-images paths uninterrupted, then with --resume killed (SIGKILL
to its process group) once half of its chunks are committed and started again: total time of the
two runs against the uninterrupted one, the main process's peak RSS, and whether the outputs are
equal. Then the same paths as --shards parts embedded one after another and `protloc merge`d.

Flat memory is the claim: peak RSS at 20,000 images should be within a few MB of that at 2,000.
"""

import argparse
import csv
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


EMBED = ["--weights", "random", "--arch", "vit_tiny", "--depth", "2", "--size", "64", "--workers", "2", "--quiet"]


def linked_folder(base: str, fields: list[str], folder: str, n: int) -> str:
    """n distinct paths (hard links) to the fields of `base`, in `folder`."""
    os.makedirs(folder)
    for i in range(n):
        os.link(os.path.join(base, fields[i % len(fields)]), os.path.join(folder, f"f{i:06d}.tif"))
    return folder


def killed_and_resumed(folder: str, out: str, fraction: float = 0.5):
    """Run `embed --resume`, SIGKILL its process group once `fraction` of the chunks are committed,
    then run it again to the end. (total seconds, peak RSS MB of the two runs, chunks at the kill)."""
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


def sharded_and_merged(folder: str, tmp: str, parts: int):
    """Embed `parts` shards one after another, then merge them: (embed seconds, merge seconds, merge RSS MB)."""
    embed_s = 0.0
    outs = [os.path.join(tmp, f"part{i}.npz") for i in range(1, parts + 1)]
    for i, out in enumerate(outs, start=1):
        embed_s += run_measured(protloc("embed", folder, *EMBED, "--shard", f"{i}/{parts}", "-o", out))[0]
    merge_s, merge_rss = run_measured(protloc("merge", *reversed(outs), "-o", os.path.join(tmp, "merged.npz")))
    return embed_s, merge_s, merge_rss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="2000,20000")
    ap.add_argument("--knn-rows", type=int, default=100000)
    ap.add_argument("--resume-images", type=int, default=100000,
                    help="images for the kill-and-resume and the shard-and-merge rows (0: skip them)")
    ap.add_argument("--shards", type=int, default=10)
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
            folder = linked_folder(base, fields, os.path.join(tmp, f"n{n}"), n)
            seconds, rss = run_measured(protloc("embed", folder, *EMBED, "-o", os.path.join(tmp, f"e{n}.npz")))
            lines.append(f"{f'embed {n:,} images':<40} {seconds:>8.1f} {rss:>12.0f}")
            print(lines[-1], flush=True)
            shutil.rmtree(folder)
        if args.resume_images:
            n = args.resume_images
            folder = linked_folder(base, fields, os.path.join(tmp, "resume"), n)
            plain_s, plain_rss = run_measured(protloc("embed", folder, *EMBED, "-o", os.path.join(tmp, "plain.npz")))
            lines.append(f"{f'embed {n:,} images, uninterrupted':<40} {plain_s:>8.1f} {plain_rss:>12.0f}")
            print(lines[-1], flush=True)
            total_s, rss, chunks = killed_and_resumed(folder, os.path.join(tmp, "resumed.npz"))
            lines.append(f"{f'  --resume, SIGKILL at chunk {chunks}, resumed':<40} {total_s:>8.1f} {rss:>12.0f}"
                         f"   {total_s / plain_s:.2f}x the uninterrupted time")
            print(lines[-1], flush=True)
            with np.load(os.path.join(tmp, "plain.npz")) as a, np.load(os.path.join(tmp, "resumed.npz")) as b:
                same = np.array_equal(a["embeddings"], b["embeddings"]) and np.array_equal(a["ids"], b["ids"])
            lines.append(f"#   resumed output equals the uninterrupted one bit for bit: {same}")
            embed_s, merge_s, merge_rss = sharded_and_merged(folder, tmp, args.shards)
            lines.append(f"{f'  as {args.shards} --shard parts, one by one':<40} {embed_s:>8.1f} {'':>12}")
            lines.append(f"{f'  protloc merge of the {args.shards} parts':<40} {merge_s:>8.1f} {merge_rss:>12.0f}")
            print("\n".join(lines[-3:]), flush=True)
            shutil.rmtree(folder)

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
