#!/usr/bin/env bash
# IF 2D beside IF 3D on the offline benchmark (bench/RESULTS.md, "IF 2D vs IF 3D"):
# trains the small-2d preset (20 epochs) on the bundled model's training data (bench/bundle_model.sh
# makes data/prep96), then scores it and the bundled IF 3D model on the same cases.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-20}
if [ ! -d data/prep96 ]; then
  ifad-fast synth -o data/synth_train --healthy 48 --lesions 0 --seed 0
  ifad-fast prepare data/synth_train/healthy -o data/prep96 --preset small --mode-pool 2 --overwrite
fi
ifad-fast train data/prep96 -o runs/small-2d --preset small-2d --epochs "$EPOCHS" --device cpu
ifad-fast bench accuracy --compare runs/small-2d/model.pt --n-test 8 --n-val 6 \
  --acquisitions 1.5mm,1mm,1x1x3mm,lps --backend cpu --device cpu -o runs/acc-2d
