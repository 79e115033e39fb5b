#!/usr/bin/env bash
# End-to-end `ifad-fast restore` wall times (process start to outputs written), one at a time, twice each:
# the paper-sized random model on bench speed's brain at 160³ (bench/make_paper160.py), a briefly trained
# paper-sized model with a threshold when WORK holds paper160_trained.pt (bench/train_paper160.py), and the
# bundled model on a 1 mm synthetic lesion scan; each with this checkout and with an older one (OLD, a git worktree) for
# the ratio in the same run. Then the paper-style code's whole restore, extrapolated as bench speed does.
#   bash bench/cli_timing.sh WORK_DIR [OLD_CHECKOUT]
set -u
work=$1; old=${2:-}; here=$(cd "$(dirname "$0")/.." && pwd)
python "$here/bench/make_paper160.py" "$work"
python - "$work" <<'PY'
import sys, numpy as np, nibabel as nib
from ifad_fast.synth import generate_lesion
c = generate_lesion(0, seed=2, voxel_mm=1.0)
nib.save(nib.Nifti1Image(c.image.astype(np.float32), c.affine), f"{sys.argv[1]}/lesion1mm.nii.gz")
PY
run() {   # label checkout args...
  local label=$1 checkout=$2; shift 2; rm -rf "$work/out"
  local t0=$(date +%s.%N)
  PYTHONPATH=$checkout python -m ifad_fast.cli restore "$@" -o "$work/out" -q > "$work/log" 2>&1
  local rc=$? t1=$(date +%s.%N)
  echo "$label rc=$rc $(python -c "print(round($t1 - $t0, 1))") s"
}
echo "start $(date -u) load $(cut -d' ' -f1-3 /proc/loadavg)"
for rep in 1 2; do
  [ -n "$old" ] && run "paper160 old" "$old" "$work/scan160.nii.gz" -m "$work/paper160.pt" --backend cpu
  run "paper160 new" "$here" "$work/scan160.nii.gz" -m "$work/paper160.pt" --backend cpu
  # a briefly trained paper-sized model with a threshold (bench/train_paper160.py), when WORK holds one
  [ -f "$work/paper160_trained.pt" ] && run "paper160 trained new" "$here" "$work/scan160.nii.gz" \
    -m "$work/paper160_trained.pt" --backend cpu
  [ -n "$old" ] && run "bundled old" "$old" "$work/lesion1mm.nii.gz"
  run "bundled new (adaptive)" "$here" "$work/lesion1mm.nii.gz"
  run "bundled new --grid full" "$here" "$work/lesion1mm.nii.gz" --grid full
done
PYTHONPATH=$here python - <<'PY'
import torch, torch.nn.functional as F
from ifad_fast import config as cfg, reference as paper
from ifad_fast.model import Decoder
from ifad_fast.benchmarks.speed import benchmark_volume, timed
torch.manual_seed(0); mc = cfg.ModelConfig(); dec = Decoder(mc).eval()
with torch.no_grad():
    for layer in dec.layers:
        g = layer.parametrizations.weight.original0; g.mul_(torch.rand_like(g) + 0.5)
classes, _ = benchmark_volume(160); classes = torch.from_numpy(classes); shape = tuple(classes.shape)
z = torch.randn(1, mc.latent_dim) / 16; k = 16200; gen = torch.Generator().manual_seed(0)
idx = (torch.rand(1, k, 3, generator=gen) * torch.tensor(shape)).long()
lin = (idx[..., 0] * shape[1] + idx[..., 1]) * shape[2] + idx[..., 2]
targets = classes.reshape(1, -1).long().gather(1, lin)
t_step = timed(lambda: paper.reference_step(dec, z, idx, targets, shape), 3)
n = classes.numel()
ci = torch.stack(torch.meshgrid(*(torch.arange(s) for s in shape), indexing="ij"), -1).reshape(-1, 3)[n // 2:n // 2 + 65536]
t_chunk = timed(lambda: paper.reference_score(dec, z[0], ci, classes.reshape(-1)[n // 2:n // 2 + 65536], shape), 1)
s = torch.rand(shape)
t_post = timed(lambda: F.avg_pool3d(-F.max_pool3d(-s[None, None], 3, 1, 1), 15, 1, 7), 1)
print(f"paper-style code: step {t_step:.3f} s; 700 steps {700 * t_step:.1f} s; grid {t_chunk * n / 65536:.1f} s; "
      f"post {t_post:.1f} s; total {700 * t_step + t_chunk * n / 65536 + t_post:.1f} s")
PY
echo "end $(date -u) load $(cut -d' ' -f1-3 /proc/loadavg)"
