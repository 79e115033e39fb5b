"""Auto-decoder training: per-volume latents learnt jointly with the decoder weights.

Each epoch visits every training volume once, in batches of S volumes × K random voxels (a 2D
model: every axial slice holding brain, in batches of S slices × K voxels of each slice, one
latent per slice; ifad_fast/restore/slices.py);
loss = mean cross-entropy + the latent prior. Checkpoints hold everything needed to resume
bit-for-bit (weights, latents, Adam state, RNG states, loss log) and what the run was trained on
(`data_fingerprint`: a resume with other data is refused). They are only ever written
between epochs: Ctrl-C asks the run to stop at the end of the current epoch (a second Ctrl-C
stops at once, keeping the last checkpoint), so a resumed run repeats an uninterrupted one.
`loss.jsonl` gets a line after every epoch.

Data parallel (`group` with world size W > 1, see distributed.py): the decoder weights, the
latent table (N × D: 1 MB for 1,000 volumes at D = 256) and their Adam state are replicated on
every process and stay identical: every process draws the whole global batch from the same
seeded generator (so the batches do not depend on W), computes the cross-entropy of its own
K/W points of every volume, and one all-reduce per step sums the weight gradients, the
gradients of the batch's latents and the loss; every process then takes the same Adam step.
The run is therefore the single-process run, up to the order of float sums, for any W; a
checkpoint written at one world size resumes at any other. Points rather than volumes are
split so the processes' shares are equal whatever S and W are.

The step (`hoisted_logits`): z's share of layer 0 and of layer `latent_in` is one vector per
volume (W_z·z + b), not per point, so the per-point matmuls read γ(p) (6L wide) instead of
[z, γ(p)] (D + 6L), and no gradient is formed for the per-point copies of z. precision="bf16"
runs the decoder under torch.autocast (weights, Adam and the loss stay float32).

Augmentation (opt-in, `TrainConfig.augment`; augment.py): the targets of a step's points are
computed from the prepared intensities (contrast, bias field, Rician noise: redrawn per epoch
and volume) and/or read through a fixed per-copy warp (deform: `augment_copies` virtual
subjects per volume, each with its own latent; sample r is copy r // N of volume r % N). Every
augmentation draw is seeded by (seed, epoch, volume, copy), not by the run's generator, so the
run's own draws (order, points, dropout) are those of an unaugmented run and a resumed run
repeats an uninterrupted one. With augment = () nothing of this runs.
"""
from __future__ import annotations

import hashlib
import json
import math
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import config as cfg
from .augment import Augmenter, uses_intensities
from .distributed import SINGLE, Group, from_env
from .errors import IfadError, IfadWarning
from .io import atomic_path, describe_os_error, save_json
from .model import Decoder, Model, layer_shapes, positional_encoding, save_model, voxel_coords
from .progress import progress_bar
from .sampling import PointSampler, as_tensor
from .restore.slices import SliceSampler


def latent_prior(z: torch.Tensor, tc: cfg.TrainConfig, epoch: int, k: int) -> torch.Tensor:
    """The prior term for a batch of latents z (S, D), next to the mean data loss.

    paper: ‖z‖²/(σ² K) averaged over volumes (eq. 2 divided by the points per volume);
    reference: λ·min(1, epoch/ramp)·‖z‖ averaged over volumes (DeepSDF); none: 0.
    """
    if tc.prior == "paper":
        return (z * z).sum(1).mean() / (tc.sigma ** 2 * k)
    if tc.prior == "reference":
        ramp = min(1.0, epoch / max(tc.norm_ramp_epochs, 1))
        return tc.norm_penalty * ramp * z.norm(dim=1).mean()
    if tc.prior == "none":
        return z.sum() * 0.0
    raise IfadError(f"unknown latent prior {tc.prior!r}; use paper, reference or none")


def _renorm_(latents: torch.Tensor, rows: torch.Tensor, max_norm: float):
    """Embedding-style max-norm: rescale the looked-up rows whose norm exceeds max_norm."""
    with torch.no_grad():
        norms = latents[rows].norm(dim=1, keepdim=True)
        latents[rows] *= torch.clamp(max_norm / (norms + 1e-7), max=1.0)


def hoisted_logits(decoder: Decoder, z: torch.Tensor, idx: torch.Tensor, shape) -> torch.Tensor:
    """decoder.logits_at(z, idx, shape) computed with z's terms once per volume; differentiable.

    z: (B, D) float32; idx: (B, K, 3) voxel indices -> (B, K, C) logits. Layer 0 is
    W0γ·γ(p) + (W0z·z + b0) and layer latent_in is W_rh·h + W_rγ·γ(p) + (W_rz·z + b_r), the
    bracketed terms (B, H) broadcast over the K points; dropout as in Decoder.forward.
    """
    mc = decoder.config
    d, e = mc.latent_dim, 6 * mc.n_freqs
    enc = positional_encoding(voxel_coords(idx, shape), mc.n_freqs).to(z.dtype)  # (B, K, 6L)
    layers = decoder.layers
    h = enc
    for i, layer in enumerate(layers[:-1]):
        w = layer.weight                                                     # weight norm applied once
        if i == 0:
            pre = F.linear(enc, w[:, d:]) + F.linear(z, w[:, :d], layer.bias)[:, None]
        elif i == mc.latent_in:
            hr = w.shape[1] - d - e
            pre = (F.linear(h, w[:, :hr]) + F.linear(enc, w[:, hr + d:])
                   + F.linear(z, w[:, hr:hr + d], layer.bias)[:, None])
        else:
            pre = F.linear(h, w, layer.bias)
        h = F.relu(pre)
        if mc.dropout > 0:
            h = F.dropout(h, mc.dropout, decoder.training)
    return layers[-1](h)


def plain_logits(decoder: Decoder, z: torch.Tensor, idx: torch.Tensor, shape) -> torch.Tensor:
    """The reference step's forward: every point reads [z, γ(p)] (Decoder.logits_at)."""
    return decoder.logits_at(z, idx, shape)


STEPS = {"hoisted": hoisted_logits, "plain": plain_logits}


def estimate_seconds(mc: cfg.ModelConfig, tc: cfg.TrainConfig, n_volumes: int, epochs: int,
                     device="cpu") -> tuple[float, float]:
    """A rough training-time estimate: (seconds, measured matmul FLOP/s on `device`).

    n_volumes: the training samples (volumes; brain slices for a 2D model).
    FLOPs = 6 × (multiply-adds of one point's forward) × points per epoch × epochs (forward,
    then backward for activations and weights), run at half the rate of a plain float32 matmul
    of the decoder's width measured here (training never reaches the matmul peak).
    """
    device = torch.device(device)
    macs = sum(o * i for o, i in layer_shapes(mc))
    flops = 6.0 * macs * tc.points_per_volume * n_volumes * epochs
    with torch.random.fork_rng(devices=[]):
        a = torch.randn(4096, mc.hidden, device=device)
        b = torch.randn(mc.hidden, mc.hidden, device=device)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    rate = 2.0 * 4096 * mc.hidden * mc.hidden / max(best, 1e-9)
    return flops / (0.5 * rate), rate


def data_fingerprint(volumes, brains, names, intensities=None) -> dict:
    """What a checkpoint records of its training data: the case names, the stack's shape and a
    BLAKE2b hash of the class volumes and brain masks (arrays or tensors, read a volume at a time),
    and of the intensity stack when given (runs whose augmentation reads it; without it the record
    is what it always was, so older checkpoints resume)."""
    h = hashlib.blake2b(digest_size=16)
    for stack in (volumes, brains if brains is not None else (), intensities if intensities is not None else ()):
        for v in stack:
            h.update(np.ascontiguousarray(v.cpu().numpy() if isinstance(v, torch.Tensor) else v))
    return dict(cases=list(names), shape=[int(n) for n in volumes.shape], blake2b=h.hexdigest())


def _data_difference(old: dict, new: dict) -> str:
    """How the data a checkpoint records differs from `new` (data_fingerprint's), in a few words."""
    def few(names):
        return ", ".join(names[:3]) + (f" … ({len(names)} cases)" if len(names) > 3 else "")
    if old.get("cases") != new["cases"]:
        return f"cases {few(old.get('cases') or [])}; now {few(new['cases'])}"
    if old.get("shape") != new["shape"]:
        return f"a {'×'.join(map(str, old.get('shape') or []))} stack; now {'×'.join(map(str, new['shape']))}"
    return "the same case names, other voxels"


def _check_augmentation(tc: cfg.TrainConfig, mc: cfg.ModelConfig, volumes, intensities):
    """IfadError unless tc.augment can run on this model and data; the intensity stack as a tensor
    (None when no augmentation reads it)."""
    if mc.variant == "2d" and ("deform" in tc.augment or tc.augment_copies > 1):
        raise IfadError("the deform augmentation (virtual subjects) is for 3D models; a 2D model takes "
                        "contrast, bias and noise")
    if not uses_intensities(tc.augment):
        return None
    if intensities is None:
        raise IfadError(f"augmentation {','.join(k for k in tc.augment if k != 'deform')} needs the prepared "
                        "intensities (intensities.npy); run 'ifad-fast prepare' again")
    intensities = as_tensor(intensities)
    if tuple(intensities.shape) != tuple(volumes.shape) or not intensities.is_floating_point():
        raise IfadError(f"intensities {tuple(intensities.shape)} {intensities.dtype} do not match the class "
                        f"volumes {tuple(volumes.shape)}; run 'ifad-fast prepare' again")
    return intensities


class _StopAfterEpoch:
    """While active (main thread only), the first SIGINT only sets `requested`; a second one
    raises KeyboardInterrupt at once."""

    def __init__(self, announce: bool = True):
        self.requested = False
        self.announce = announce
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("interrupt: finishing this epoch, then saving a checkpoint (Ctrl-C again to stop now "
              "without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _fits_on(device: torch.device, *tensors) -> bool:
    """Whether the tensors (class volumes, brain masks) take at most a quarter of the GPU's free memory."""
    try:
        free = torch.cuda.mem_get_info(device)[0]
    except Exception:
        return False
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) <= free // 4


class Trainer:
    """Holds the state of one training run; `run(epochs)` advances it, `save`/`load` persist it.

    volumes: (N, X, Y, Z) uint8 class volumes, a tensor or numpy array, and brains (optional,
    same shape, nonzero = brain: where tc.brain_fraction of the points are drawn; default the
    nonzero classes); numpy memmaps are read in place (never copied); on a GPU they are copied to it when they take at most a quarter of
    its free memory (point draws and class lookups then run there). provenance: what config.json (and the model's info) should say
    about the run, e.g. the data folder and preset name; the ifad-fast version is added.
    group: this process's place in a data-parallel run (default: alone). precision: float32 or
    bf16 (autocast). step: hoisted (the fast step) or plain (the reference). data: what
    checkpoints record of the training data, checked on `load` (default: `data_fingerprint`).
    intensities: (N, X, Y, Z) float16 normalised intensities (the prepared `intensities.npy`),
    needed by tc.augment's contrast, bias and noise; mode_pool: the window the classes were
    pooled with (default pc.train_mode_pool), which augmented targets are pooled with too.
    """

    def __init__(self, volumes, mc: cfg.ModelConfig, tc: cfg.TrainConfig,
                 pc: cfg.PreprocessConfig, centres, device="cpu", names=None, provenance: dict | None = None,
                 brains=None, group: Group = SINGLE, precision: str = "float32", step: str = "hoisted",
                 data: dict | None = None, intensities=None, mode_pool: int | None = None):
        from . import __version__

        volumes = as_tensor(volumes)              # tc was checked when it was built (TrainConfig)
        if volumes.ndim != 4 or volumes.shape[0] < 1:
            raise IfadError("training needs at least one encoded volume")
        brains = None if brains is None else as_tensor(brains)
        if brains is not None and brains.shape != volumes.shape:
            raise IfadError(f"brain masks {tuple(brains.shape)} do not match the volumes {tuple(volumes.shape)}")
        if int(volumes.max()) >= mc.n_classes:
            raise IfadError(f"volumes hold class {int(volumes.max())} but the model has {mc.n_classes} classes; "
                            "use centres with as many classes as the model")
        if precision not in cfg.TRAIN_PRECISIONS:
            raise IfadError(f"unknown training precision {precision!r}; choose {' or '.join(cfg.TRAIN_PRECISIONS)}")
        if step not in STEPS:
            raise IfadError(f"unknown training step {step!r}; choose {' or '.join(STEPS)}")
        augmenting = bool(tc.augment)
        if augmenting:
            intensities = _check_augmentation(tc, mc, volumes, intensities)
        else:
            intensities = None                        # off: nothing of augment.py runs
        self.device = torch.device(device)
        if precision == "bf16" and self.device.type == "cpu":
            from .backends.base import cpu_has_native_bf16 as _cpu_has_native_bf16
            if not _cpu_has_native_bf16():
                import warnings
                warnings.warn("precision='bf16' on a CPU without native bf16 instructions: its bf16 matmuls "
                              "are emulated and much slower than float32", RuntimeWarning, stacklevel=2)
        if self.device.type == "cuda" and _fits_on(self.device, volumes, brains, intensities):
            volumes = volumes.to(self.device)         # point draws and class lookups on the GPU too
            brains = None if brains is None else brains.to(self.device)
            intensities = None if intensities is None else intensities.to(self.device)
        self.volumes = volumes                        # else it stays where it is (CPU / memmap)
        self.flat = volumes.reshape(volumes.shape[0], -1)
        self.mc, self.tc, self.pc = mc, tc, pc
        self.group, self.precision, self.logits = group, precision, STEPS[step]
        self.centres = torch.as_tensor(np.asarray(centres), dtype=torch.float64)
        self.names = list(names) if names is not None else [f"vol{i}" for i in range(len(volumes))]
        self.data = data or data_fingerprint(volumes, brains, self.names, intensities)
        self.generator = torch.Generator().manual_seed(tc.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tc.seed)
            self.decoder = Decoder(mc).to(self.device)
        # brains: the scans' own support (nonzero = brain, like volumes): class 0 can hold brain voxels
        # after min-max normalisation; without them, the nonzero classes
        focus = volumes if brains is None else brains
        if mc.variant == "2d":      # IF 2D: a sample, and a latent, per axial slice holding brain (restore/slices.py)
            self.sampler = SliceSampler(focus, tc.brain_fraction)
        else:
            self.sampler = PointSampler(volumes.shape[1:], focus, tc.brain_fraction)
        n_samples = len(self.sampler) if mc.variant == "2d" else len(volumes) * tc.augment_copies
        self.augmenter = None
        if augmenting:
            flat_brains = self.flat if brains is None else brains.reshape(brains.shape[0], -1)
            self.augmenter = Augmenter(tc, self.flat, None if intensities is None else
                                       intensities.reshape(intensities.shape[0], -1), flat_brains,
                                       volumes.shape[1:], self.centres,
                                       pc.train_mode_pool if mode_pool is None else mode_pool, self.device)
        self.latents = (torch.randn(n_samples, mc.latent_dim, generator=self.generator)
                        * tc.latent_init_std).to(self.device).requires_grad_(True)
        self.optimizer = torch.optim.Adam([
            {"params": list(self.decoder.parameters()), "lr": tc.lr_weights},
            {"params": [self.latents], "lr": tc.lr_latents},
        ])
        self.epoch = 0
        self.log: list[dict] = []
        self.provenance = dict(provenance or {}, ifad_fast=__version__)

    def _set_learning_rates(self):
        factor = self.tc.lr_gamma ** (self.epoch // max(self.tc.lr_step_epochs, 1))
        self.optimizer.param_groups[0]["lr"] = self.tc.lr_weights * factor
        self.optimizer.param_groups[1]["lr"] = self.tc.lr_latents * factor

    def _share(self, k: int) -> slice:
        """This process's points of each volume: a contiguous K/W slice of range(K)."""
        g = self.group
        return slice(g.rank * k // g.world, (g.rank + 1) * k // g.world)

    def train_epoch(self) -> float:
        """One pass over every volume; returns the epoch's mean data loss (cross-entropy)."""
        tc, shape, g = self.tc, tuple(self.volumes.shape[1:]), self.group
        self.decoder.train()
        self._set_learning_rates()
        # dropout draws from torch's global RNG: reseed it from the run's own generator each epoch
        # (plus the rank: each process drops out on its own points)
        torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=self.generator)) + g.rank)
        n, k = len(self.latents), tc.points_per_volume       # the samples: volumes, or (volume, slice) pairs in 2D
        order = torch.randperm(n, generator=self.generator)
        params = list(self.decoder.parameters())
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0   # no sync per step
        for start in range(0, n, tc.volumes_per_batch):
            rows = order[start:start + tc.volumes_per_batch]
            if self.augmenter is None:
                idx, lin = self.sampler.draw(rows, k, self.generator, part=self._share(k))
                vols = self.sampler.volumes_of(rows) if self.mc.variant == "2d" else rows
                targets = self.flat[vols.to(self.flat.device)[:, None], lin.to(self.flat.device)]  # (B, P) uint8
            else:                          # sample r: copy r // N of volume r % N (3D); a slice's volume (2D)
                nv = len(self.volumes)
                vols = self.sampler.volumes_of(rows) if self.mc.variant == "2d" else rows % nv
                idx, lin = self.sampler.draw(rows if self.mc.variant == "2d" else vols, k, self.generator,
                                             part=self._share(k))
                copies = torch.zeros_like(vols) if self.mc.variant == "2d" else rows // nv
                targets = self.augmenter.targets(self.epoch, vols.cpu(), copies.cpu(), idx)
            rows_d, idx, targets = rows.to(self.device), idx.to(self.device), targets.to(self.device).long()
            if tc.prior == "reference":
                _renorm_(self.latents, rows_d, tc.max_norm)
            z = self.latents[rows_d]
            with autocast:
                logits = self.logits(self.decoder, z, idx, shape)
            points = len(rows) * k                                           # the global batch's points
            data = F.cross_entropy(logits.reshape(-1, self.mc.n_classes).float(), targets.reshape(-1),
                                   reduction="sum")
            loss = data / points
            if g.main:                                                       # the prior is counted once
                loss = loss + latent_prior(z, tc, self.epoch, k)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            data_sum = self._all_reduce_grads(params, rows_d, data.detach())
            self.optimizer.step()
            total += data_sum
            count += points
        self.epoch += 1
        return total.item() / count

    def _all_reduce_grads(self, params, rows_d, data_sum: torch.Tensor) -> torch.Tensor:
        """Sum the weight gradients, the batch latents' gradients and the data loss over processes.

        One flat buffer, one all_reduce; the latent rows outside the batch have zero gradient
        everywhere and are left out. Returns the summed data loss (a 0-d tensor).
        """
        if self.group.world == 1:
            return data_sum
        grads = [p.grad.reshape(-1) for p in params]
        zrows = self.latents.grad[rows_d]
        flat = torch.cat(grads + [zrows.reshape(-1), data_sum.reshape(1).to(zrows.dtype)])
        self.group.all_reduce_(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()
        self.latents.grad[rows_d] = flat[offset:offset + zrows.numel()].view_as(zrows)
        return flat[-1]

    def checksum(self) -> float:
        """A float64 digest of the replicated state (weights and latents)."""
        with torch.no_grad():
            return float(sum(p.double().sum() + (p.double() ** 2).sum() for p in
                             list(self.decoder.parameters()) + [self.latents]))

    def run(self, epochs: int, run_dir: Path | None = None, progress: bool = True) -> Model:
        """Train until `epochs` epochs are done, checkpointing every tc.checkpoint_every and on Ctrl-C.

        Ctrl-C (SIGINT) lets the current epoch finish, saves a checkpoint and then raises
        KeyboardInterrupt; a second Ctrl-C raises at once without saving.
        """
        if run_dir is not None:
            run_dir = Path(run_dir)
            self._write_loss_log(run_dir)        # drops lines of epochs after the checkpoint
        bar = progress_bar(total=epochs, initial=self.epoch, desc="train", unit="epoch",
                           disable=None if progress and self.group.main else True)
        try:
            with _StopAfterEpoch(announce=self.group.main) as stop:
                while self.epoch < epochs:
                    t0 = time.perf_counter()
                    loss = self.train_epoch()
                    row = {"epoch": self.epoch, "loss": loss, "seconds": time.perf_counter() - t0,
                           "latent_norm": float(self.latents.detach().norm(dim=1).mean())}
                    self.log.append(row)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    bar.update(1)
                    stopping = self.group.any(stop.requested)      # every process stops after the same epoch
                    if run_dir is not None:
                        if self.epoch % self.tc.checkpoint_every == 0 or self.epoch == epochs or stopping:
                            if not self.group.agree(self.checksum()):
                                raise RuntimeError(f"the training processes' states differ at epoch {self.epoch}")
                            self.save(run_dir)
                        else:
                            self._append_loss(run_dir, row)
                    if stopping and self.epoch < epochs:
                        if run_dir is not None and self.group.main:
                            bar.write(f"interrupted: checkpoint saved at epoch {self.epoch} in {run_dir}; "
                                      "continue with --resume")
                        raise KeyboardInterrupt
        finally:
            bar.close()
        return self.model()

    def _write_loss_log(self, run_dir: Path):
        if not self.group.main:
            return
        with atomic_path(run_dir / "loss.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in self.log))

    def _append_loss(self, run_dir: Path, row: dict):
        if not self.group.main:
            return
        try:
            with open(run_dir / "loss.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as exc:
            raise IfadError(describe_os_error(exc, run_dir / "loss.jsonl")) from None

    def model(self) -> Model:
        """The trained model as it stands (a CPU copy; the training RNG is not touched)."""
        with torch.random.fork_rng(devices=[]):  # building a copy must not move the training RNG
            decoder = Decoder(self.mc)
        decoder.load_state_dict(self.decoder.state_dict())
        return Model(decoder=decoder.eval(), centres=self.centres, preprocess=self.pc,
                     latents=self.latents.detach().cpu().clone(), train=self.tc,
                     info={**self.provenance, "epochs": self.epoch, "volumes": self.names,
                           "final_loss": self.log[-1]["loss"] if self.log else None, **self._sample_info()})

    def _sample_info(self) -> dict:
        """2D models: how many latents (brain slices) each training volume has."""
        if self.mc.variant != "2d":
            return {}
        return {"slices_per_volume": self.sampler.slices_per_volume(len(self.volumes))}

    def save(self, run_dir: Path):
        """model.pt (inference), checkpoint.pt (+ optimiser and RNG state), config.json, loss.jsonl.

        Only the main process writes (the state is the same in every process).
        """
        if not self.group.main:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_model(self.model(), run_dir / "model.pt")
        state = self.model().to_payload()
        state.update(optimizer=self.optimizer.state_dict(), epoch=self.epoch,
                     generator=self.generator.get_state(),
                     log=json.dumps(self.log), data=json.dumps(self.data))
        with atomic_path(run_dir / "checkpoint.pt") as tmp:
            torch.save(state, tmp)
        save_json(run_dir / "config.json", {**self.provenance, "epochs_done": self.epoch,
                                            "model": cfg.to_dict(self.mc), "train": cfg.to_dict(self.tc),
                                            "preprocess": cfg.to_dict(self.pc),
                                            "centres": self.centres.tolist(), "volumes": self.names,
                                            "processes": self.group.world, "precision": self.precision})
        self._write_loss_log(run_dir)

    def load(self, run_dir: Path):
        """Continue from run_dir/checkpoint.pt (written at any number of processes).

        IfadError when the file is damaged (unreadable, truncated, a field missing or malformed)
        or does not match this data and configuration; nothing is changed before all is checked.
        """
        path = Path(run_dir) / "checkpoint.pt"
        if not path.is_file():
            raise IfadError(f"{path}: no checkpoint to resume from; start without --resume")

        def damaged(why: str) -> IfadError:
            return IfadError(f"{path} is damaged ({why}); start a new run or restore it from a copy")

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise damaged(f"{type(exc).__name__}: truncated or not a checkpoint") from None
        if not isinstance(state, dict):
            raise damaged("not a checkpoint")
        missing = [k for k in ("decoder", "latents", "optimizer", "epoch", "generator", "log") if k not in state]
        if missing:
            raise damaged(f"no {', '.join(missing)}")
        epoch = state["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise damaged(f"epoch {epoch!r} is not a whole number")
        try:
            torch.Generator().set_state(state["generator"])
        except Exception:
            raise damaged("its random generator state is unreadable") from None
        try:
            log = json.loads(state["log"])
        except (TypeError, ValueError):
            raise damaged("its loss log is not JSON") from None
        if not (isinstance(log, list) and all(isinstance(row, dict) and "loss" in row for row in log)):
            raise damaged("its loss log is not a list of epochs")
        self._check_data(state.get("data"), run_dir, damaged)
        try:
            self.decoder.load_state_dict(state["decoder"])
            with torch.no_grad():
                self.latents.copy_(state["latents"].to(self.device))
            self.optimizer.load_state_dict(state["optimizer"])
        except Exception as exc:
            raise IfadError(f"{path}: cannot resume ({type(exc).__name__}: the checkpoint does not match "
                            "this data or configuration); start a new run folder") from None
        self.epoch = epoch
        self.generator.set_state(state["generator"])
        self.log = log

    def _check_data(self, recorded, run_dir, damaged):
        """IfadError unless a checkpoint's recorded data (JSON) is this trainer's; an IfadWarning
        when it records none (an older checkpoint)."""
        if recorded is None:
            if self.group.main:
                warnings.warn(IfadWarning(f"{Path(run_dir) / 'checkpoint.pt'} does not record its training data "
                                          "(an older ifad-fast wrote it): cannot check that DATA is the same"))
            return
        try:
            old = json.loads(recorded)
        except (TypeError, ValueError):
            old = None
        if not isinstance(old, dict):
            raise damaged("its record of the training data is unreadable")
        if old != self.data:
            raise IfadError(f"{run_dir} was trained on other data ({_data_difference(old, self.data)}); "
                            "pass the same DATA or start a new run")


@dataclass(frozen=True)
class TrainJob:
    """One training run as every process sees it (picklable: it is sent to spawned processes)."""

    volumes: str                 # a (N, R, R, R) uint8 .npy stack, memory-mapped by each process
    brains: str | None           # the brain masks' stack (same shape), or None: the nonzero classes
    names: tuple
    centres: tuple
    model: cfg.ModelConfig
    train: cfg.TrainConfig
    preprocess: cfg.PreprocessConfig
    out: str                     # run folder
    device: str = "cpu"          # cpu | cuda (each process of a CUDA run takes cuda:LOCAL_RANK) | cuda:N alone
    resume: bool = False
    precision: str = "float32"
    threads: int | None = None
    progress: bool = True
    provenance: tuple = ()       # (key, value) pairs for config.json and the model's info
    data: tuple = ()             # data_fingerprint's (key, value) pairs, computed once; (): by each process
    intensities: str | None = None   # the (N, R, R, R) float16 intensity stack, read by train.augment's kinds
    mode_pool: int | None = None     # the classes' mode pool (the prepared manifest's); None: preprocess's


def train_job(job: TrainJob) -> dict:
    """This process's part of `job`: alone, under distributed.launch, or under torchrun.

    Returns {"epochs", "final_loss", "seconds"} (the same in every process).
    """
    group, device = from_env(torch.device(job.device))
    if job.threads:
        torch.set_num_threads(job.threads)
    volumes = np.load(job.volumes, mmap_mode="r")
    brains = None if job.brains is None else np.load(job.brains, mmap_mode="r")
    intensities = (np.load(job.intensities, mmap_mode="r")
                   if job.intensities is not None and uses_intensities(job.train.augment) else None)
    trainer = Trainer(volumes, job.model, job.train, job.preprocess, np.asarray(job.centres), device,
                      job.names, provenance=dict(job.provenance), brains=brains, group=group,
                      precision=job.precision, data=dict(job.data), intensities=intensities,
                      mode_pool=job.mode_pool)
    if job.resume:
        trainer.load(job.out)
    t0 = time.perf_counter()
    trainer.run(job.train.epochs, Path(job.out), progress=job.progress)
    return dict(epochs=trainer.epoch, final_loss=trainer.log[-1]["loss"] if trainer.log else None,
                seconds=time.perf_counter() - t0)
