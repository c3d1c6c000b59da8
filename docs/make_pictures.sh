#!/usr/bin/env bash
# The pictures in README.md, drawn by `protloc plot` from what `make demo` leaves in demo/:
# 320 synthetic fields (demo/cells), their random-init and DINO-pretrained (600 steps)
# embeddings, the pretraining log and checkpoint. Runs `make demo` first when those are missing
# (about 7 minutes on 2 cores); the pictures themselves take about a minute.
#
#   bash docs/make_pictures.sh        (from anywhere; writes docs/*.png, overwriting them)
set -euo pipefail
cd "$(dirname "$0")/.."
P=.venv/bin/protloc
D=demo
LABELS=$D/cells/labels.csv
for f in $LABELS $D/random.npz $D/dino.npz $D/dino.pt $D/train.jsonl; do
    [ -e "$f" ] || { make demo; break; }
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
plot() { "$P" plot "$@" --force -q; }

plot training $D/train.jsonl -o docs/training.png --title "DINO pretraining on synthetic cells (make demo: vit_tiny/8, 600 steps)"

"$P" knn $D/random.npz $D/dino.npz --labels $LABELS -k 1,3,5,10,20,50 --json "$tmp/knn.json" -q > /dev/null
plot knn "$tmp/knn.json" -o docs/knn.png --title "k-NN on synthetic cells: random init vs DINO-pretrained"

"$P" finetune $D/dino.npz --freeze --labels $LABELS --json "$tmp/cv.json" -q > /dev/null
plot confusion "$tmp/cv.json" -o docs/confusion.png \
    --title "linear head on DINO-pretrained embeddings (finetune --freeze, 5 folds grouped by protein)"

plot embedding $D/dino.npz --labels $LABELS --method tsne -o docs/embedding.png \
    --title "t-SNE of DINO-pretrained embeddings of 320 synthetic fields"

# one field of each of four classes: nuclear membrane, plasma membrane, mitochondria, centrosome
cells=($D/cells/field_00004.tif $D/cells/field_00020.tif $D/cells/field_00036.tif $D/cells/field_00000.tif)
# both at the 64 px the checkpoint records (--recipe small), as embed views the fields
plot attention "${cells[@]}" --weights $D/dino.pt -o docs/attention.png --dpi 80
plot attention "${cells[@]}" --weights random --arch vit_tiny --patch 8 --depth 4 --size 64 -o docs/attention_random.png --dpi 80

plot neighbours $D/dino.npz --query $D/cells/field_00036.tif --labels $LABELS -k 6 -o docs/neighbours.png

ls -l docs/*.png
