"""The auto-decoder: positional encoding, the weight-normed MLP, folding, checkpoints.

Layout (DeepSDF): x = [z, γ(p)] (D + 6L wide); hidden layers 0..n_layers-1 with ReLU
(and dropout in training); layer `latent_in` reads [h, z, γ(p)], so its predecessor
outputs hidden - (D + 6L); a final linear layer gives n_classes logits.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from . import config as cfg
from .errors import IfadError

FORMAT = "ifad-fast-model"
FORMAT_VERSION = 1


def positional_encoding(coords: torch.Tensor, n_freqs: int) -> torch.Tensor:
    """γ(p): (..., 3) coordinates in [-1, 1] -> (..., 6L).

    Order: coordinate-major, then frequency k = 0..L-1, then (sin, cos):
    out[..., c*2L + 2k] = sin(2^k π p_c), out[..., c*2L + 2k + 1] = cos(2^k π p_c).
    """
    freqs = math.pi * 2.0 ** torch.arange(n_freqs, device=coords.device, dtype=coords.dtype)
    angles = coords[..., :, None] * freqs                       # (..., 3, L)
    enc = torch.stack((torch.sin(angles), torch.cos(angles)), dim=-1)   # (..., 3, L, 2)
    return enc.flatten(-3)


def voxel_coords(idx: torch.Tensor, shape) -> torch.Tensor:
    """Voxel indices (..., 3) int -> coordinates (..., 3) float32 in [-1, 1] (corners aligned)."""
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape], device=idx.device)
    return idx.to(torch.float32) * scale - 1.0


def layer_shapes(mc: cfg.ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of every linear layer, the output layer last."""
    shapes = []
    for i in range(mc.n_layers):
        fan_in = mc.input_dim if i == 0 else mc.hidden
        fan_out = mc.hidden - mc.input_dim if i + 1 == mc.latent_in else mc.hidden
        shapes.append((fan_out, fan_in))
    shapes.append((mc.n_classes, mc.hidden))
    return shapes


class Decoder(nn.Module):
    """f(z, γ(p)) -> logits. Weight norm on every layer; dropout only while training.

    forward(z: (N, D) float32, enc: (N, 6L) float32) -> (N, C) float32.
    """

    def __init__(self, mc: cfg.ModelConfig, weight_normed: bool = True):
        super().__init__()
        self.config = mc
        wrap = weight_norm if weight_normed else (lambda m: m)
        self.layers = nn.ModuleList(wrap(nn.Linear(i, o)) for o, i in layer_shapes(mc))

    def forward(self, z: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        mc = self.config
        x = torch.cat((z, enc), dim=-1)
        h = x
        for i, layer in enumerate(self.layers[:-1]):
            if i == mc.latent_in:
                h = torch.cat((h, x), dim=-1)
            h = F.relu(layer(h))
            if mc.dropout > 0:
                h = F.dropout(h, mc.dropout, self.training)
        return self.layers[-1](h)

    def logits_at(self, z: torch.Tensor, idx: torch.Tensor, shape) -> torch.Tensor:
        """z: (B, D); idx: (B, K, 3) voxel indices of a grid `shape` -> (B, K, C) logits."""
        enc = positional_encoding(voxel_coords(idx, shape), self.config.n_freqs)
        return self(z[:, None, :].expand(-1, idx.shape[1], -1), enc)

    def weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Plain (W (out, in), b (out,)) per layer, weight norm folded in, detached."""
        return [(layer.weight.detach().clone(), layer.bias.detach().clone()) for layer in self.layers]

    def folded(self) -> "Decoder":
        """An inference-only copy: weight norm folded into plain weights, eval mode, no grads."""
        plain = Decoder(self.config, weight_normed=False)
        with torch.no_grad():
            for dst, (w, b) in zip(plain.layers, self.weights()):
                dst.weight.copy_(w)
                dst.bias.copy_(b)
        plain = plain.to(next(self.parameters()).device).eval()
        plain.requires_grad_(False)
        return plain


def cross_entropy_per_point(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(..., C) logits, (...) int targets -> (...) float32: -log softmax(logits)[target]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


@dataclass
class Model:
    """A trained model: decoder, intensity centres, the settings it was trained with, training latents."""

    decoder: Decoder
    centres: torch.Tensor           # (C,) float64, sorted
    preprocess: cfg.PreprocessConfig
    latents: torch.Tensor           # (N_train, D) float32
    train: cfg.TrainConfig | None = None
    info: dict | None = None

    @property
    def config(self) -> cfg.ModelConfig:
        return self.decoder.config

    def to_payload(self) -> dict:
        meta = dict(format=FORMAT, format_version=FORMAT_VERSION,
                    model=cfg.to_dict(self.config), preprocess=cfg.to_dict(self.preprocess),
                    train=cfg.to_dict(self.train) if self.train else None, info=self.info or {})
        return dict(meta=json.dumps(meta),
                    decoder={k: v.detach().cpu() for k, v in self.decoder.state_dict().items()},
                    centres=self.centres.detach().cpu().to(torch.float64),
                    latents=self.latents.detach().cpu().to(torch.float32))


def save_model(model: Model, path, extra: dict | None = None) -> Path:
    """One file, loadable without executing code (torch.load weights_only=True); written atomically."""
    from .io import atomic_path
    payload = model.to_payload()
    if extra:
        payload.update(extra)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_payload(path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise IfadError(f"{path}: no such model file; pass a model.pt file or a training run folder")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(payload["meta"])
    except Exception as exc:
        raise IfadError(f"{path}: not an ifad-fast model ({type(exc).__name__}: wrong, truncated or "
                        "foreign file); pass a model.pt written by 'ifad-fast train'") from None
    if meta.get("format") != FORMAT:
        raise IfadError(f"{path}: not an ifad-fast model file; pass a model.pt written by 'ifad-fast train'")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise IfadError(f"{path}: model format {meta['format_version']} is newer than this ifad-fast "
                        f"understands ({FORMAT_VERSION}); upgrade ifad-fast")
    payload["meta"] = meta
    return payload


def load_model(path, device="cpu") -> Model:
    payload = load_payload(path)
    meta = payload["meta"]
    try:
        mc = cfg.from_dict(cfg.ModelConfig, meta["model"])
        decoder = Decoder(mc)
        decoder.load_state_dict(payload["decoder"])
    except Exception as exc:
        raise IfadError(f"{path}: model weights do not match its configuration ({type(exc).__name__}); "
                        "the file is damaged, retrain or re-download it") from None
    train = cfg.from_dict(cfg.TrainConfig, meta["train"]) if meta.get("train") else None
    return Model(decoder=decoder.to(device).eval(), centres=payload["centres"],
                 preprocess=cfg.from_dict(cfg.PreprocessConfig, meta["preprocess"]),
                 latents=payload["latents"], train=train, info=meta.get("info", {}))


def bundled_model_path() -> Path:
    return Path(__file__).parent / "data" / "default_model.pt"
