"""Auto-decoder training: per-volume latents learnt jointly with the decoder weights.

Each epoch visits every training volume once, in batches of S volumes × K random voxels;
loss = mean cross-entropy + the latent prior. Checkpoints hold everything needed to resume
bit-for-bit (weights, latents, Adam state, RNG states, loss log). They are only ever written
between epochs: Ctrl-C asks the run to stop at the end of the current epoch (a second Ctrl-C
stops at once, keeping the last checkpoint), so a resumed run repeats an uninterrupted one.
`loss.jsonl` gets a line after every epoch.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import config as cfg
from .errors import IfadError
from .io import atomic_path, describe_os_error, save_json
from .model import Decoder, Model, layer_shapes, save_model
from .sampling import PointSampler


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


MAX_SEED = 2 ** 32 - 1        # scikit-learn's k-means (centre fitting) takes seeds up to this


def check_train_config(tc: cfg.TrainConfig) -> cfg.TrainConfig:
    """IfadError for settings training cannot run with (counts < 1, a seed out of range, a bad prior)."""
    for name in ("epochs", "volumes_per_batch", "points_per_volume", "checkpoint_every"):
        value = getattr(tc, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise IfadError(f"train setting {name} must be a whole number of at least 1, got {value!r}")
    if isinstance(tc.seed, bool) or not isinstance(tc.seed, int) or not 0 <= tc.seed <= MAX_SEED:
        raise IfadError(f"seed must be a whole number from 0 to {MAX_SEED}, got {tc.seed!r}")
    if tc.prior not in ("paper", "reference", "none"):
        raise IfadError(f"unknown latent prior {tc.prior!r}; use paper, reference or none")
    return tc


def estimate_seconds(mc: cfg.ModelConfig, tc: cfg.TrainConfig, n_volumes: int, epochs: int,
                     device="cpu") -> tuple[float, float]:
    """A rough training-time estimate: (seconds, measured matmul FLOP/s on `device`).

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


class _StopAfterEpoch:
    """While active (main thread only), the first SIGINT only sets `requested`; a second one
    raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
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


class Trainer:
    """Holds the state of one training run; `run(epochs)` advances it, `save`/`load` persist it.

    provenance: what config.json (and the model's info) should say about the run, e.g. the
    data folder and preset name; the ifad-fast version is added.
    """

    def __init__(self, volumes: torch.Tensor, mc: cfg.ModelConfig, tc: cfg.TrainConfig,
                 pc: cfg.PreprocessConfig, centres, device="cpu", names=None, provenance: dict | None = None,
                 brains: torch.Tensor | None = None):
        from . import __version__

        check_train_config(tc)
        if volumes.ndim != 4 or volumes.shape[0] < 1:
            raise IfadError("training needs at least one encoded volume")
        if int(volumes.max()) >= mc.n_classes:
            raise IfadError(f"volumes hold class {int(volumes.max())} but the model has {mc.n_classes} classes; "
                            "use centres with as many classes as the model")
        self.device = torch.device(device)
        self.volumes = volumes.to(self.device)
        self.mc, self.tc, self.pc = mc, tc, pc
        self.centres = torch.as_tensor(np.asarray(centres), dtype=torch.float64)
        self.names = list(names) if names is not None else [f"vol{i}" for i in range(len(volumes))]
        self.generator = torch.Generator().manual_seed(tc.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tc.seed)
            self.decoder = Decoder(mc).to(self.device)
        self.latents = (torch.randn(len(volumes), mc.latent_dim, generator=self.generator)
                        * tc.latent_init_std).to(self.device).requires_grad_(True)
        self.optimizer = torch.optim.Adam([
            {"params": list(self.decoder.parameters()), "lr": tc.lr_weights},
            {"params": [self.latents], "lr": tc.lr_latents},
        ])
        # brains: the scans' own support (bool like volumes); class 0 can hold brain voxels after min-max
        self.sampler = PointSampler(volumes.shape[1:], volumes != 0 if brains is None else brains, tc.brain_fraction)
        self.epoch = 0
        self.log: list[dict] = []
        self.provenance = dict(provenance or {}, ifad_fast=__version__)

    def _set_learning_rates(self):
        factor = self.tc.lr_gamma ** (self.epoch // max(self.tc.lr_step_epochs, 1))
        self.optimizer.param_groups[0]["lr"] = self.tc.lr_weights * factor
        self.optimizer.param_groups[1]["lr"] = self.tc.lr_latents * factor

    def train_epoch(self) -> float:
        """One pass over every volume; returns the epoch's mean data loss (cross-entropy)."""
        tc, shape = self.tc, tuple(self.volumes.shape[1:])
        self.decoder.train()
        self._set_learning_rates()
        # dropout draws from torch's global RNG: reseed it from the run's own generator each epoch
        torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=self.generator)))
        n = len(self.volumes)
        order = torch.randperm(n, generator=self.generator)
        flat = self.volumes.reshape(n, -1)
        total, count = 0.0, 0
        for start in range(0, n, tc.volumes_per_batch):
            rows = order[start:start + tc.volumes_per_batch]
            k = tc.points_per_volume
            idx, lin = self.sampler.draw(rows, k, self.generator)
            rows_d, idx, lin = rows.to(self.device), idx.to(self.device), lin.to(self.device)
            targets = flat[rows_d].gather(1, lin).long()
            if tc.prior == "reference":
                _renorm_(self.latents, rows_d, tc.max_norm)
            z = self.latents[rows_d]
            logits = self.decoder.logits_at(z, idx, shape)
            data = F.cross_entropy(logits.reshape(-1, self.mc.n_classes), targets.reshape(-1))
            loss = data + latent_prior(z, tc, self.epoch, k)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += data.item() * len(rows)
            count += len(rows)
        self.epoch += 1
        return total / count

    def run(self, epochs: int, run_dir: Path | None = None, progress: bool = True) -> Model:
        """Train until `epochs` epochs are done, checkpointing every tc.checkpoint_every and on Ctrl-C.

        Ctrl-C (SIGINT) lets the current epoch finish, saves a checkpoint and then raises
        KeyboardInterrupt; a second Ctrl-C raises at once without saving.
        """
        if run_dir is not None:
            run_dir = Path(run_dir)
            self._write_loss_log(run_dir)        # drops lines of epochs after the checkpoint
        bar = tqdm(total=epochs, initial=self.epoch, desc="train", unit="epoch", disable=None if progress else True)
        try:
            with _StopAfterEpoch() as stop:
                while self.epoch < epochs:
                    t0 = time.perf_counter()
                    loss = self.train_epoch()
                    row = {"epoch": self.epoch, "loss": loss, "seconds": time.perf_counter() - t0,
                           "latent_norm": float(self.latents.detach().norm(dim=1).mean())}
                    self.log.append(row)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    bar.update(1)
                    if run_dir is not None:
                        if self.epoch % self.tc.checkpoint_every == 0 or self.epoch == epochs or stop.requested:
                            self.save(run_dir)
                        else:
                            self._append_loss(run_dir, row)
                    if stop.requested and self.epoch < epochs:
                        if run_dir is not None:
                            bar.write(f"interrupted: checkpoint saved at epoch {self.epoch} in {run_dir}; "
                                      "continue with --resume")
                        raise KeyboardInterrupt
        finally:
            bar.close()
        return self.model()

    def _write_loss_log(self, run_dir: Path):
        with atomic_path(run_dir / "loss.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in self.log))

    def _append_loss(self, run_dir: Path, row: dict):
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
                           "final_loss": self.log[-1]["loss"] if self.log else None})

    def save(self, run_dir: Path):
        """model.pt (inference), checkpoint.pt (+ optimiser and RNG state), config.json, loss.jsonl."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_model(self.model(), run_dir / "model.pt")
        state = self.model().to_payload()
        state.update(optimizer=self.optimizer.state_dict(), epoch=self.epoch,
                     generator=self.generator.get_state(),
                     log=json.dumps(self.log))
        with atomic_path(run_dir / "checkpoint.pt") as tmp:
            torch.save(state, tmp)
        save_json(run_dir / "config.json", {**self.provenance, "epochs_done": self.epoch,
                                            "model": cfg.to_dict(self.mc), "train": cfg.to_dict(self.tc),
                                            "preprocess": cfg.to_dict(self.pc),
                                            "centres": self.centres.tolist(), "volumes": self.names})
        self._write_loss_log(run_dir)

    def load(self, run_dir: Path):
        """Continue from run_dir/checkpoint.pt."""
        path = Path(run_dir) / "checkpoint.pt"
        if not path.is_file():
            raise IfadError(f"{path}: no checkpoint to resume from; start without --resume")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.decoder.load_state_dict(state["decoder"])
            with torch.no_grad():
                self.latents.copy_(state["latents"].to(self.device))
            self.optimizer.load_state_dict(state["optimizer"])
        except Exception as exc:
            raise IfadError(f"{path}: cannot resume ({type(exc).__name__}: the checkpoint does not match "
                            "this data or configuration); start a new run folder") from None
        self.epoch = int(state["epoch"])
        self.generator.set_state(state["generator"])
        self.log = json.loads(state["log"])
