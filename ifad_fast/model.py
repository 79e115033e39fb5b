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
# 1: cube frame and division by the upper percentile only; 2: the preprocess settings name their
# frame (physical | cube) and normalisation (minmax | upper). Version-1 files load as cube + upper.
# 3 (FORMAT_VERSION_2D, the newest read here): the model settings name their variant. Only 2D
# models are written as 3, so a reader that predates IF 2D refuses them rather than taking slice
# latents for volume latents; 3D models are still written as 2 (FORMAT_VERSION). Files of
# versions 1 and 2 load as variant 3d.
FORMAT_VERSION = 2
FORMAT_VERSION_2D = 3


def format_version(mc: cfg.ModelConfig) -> int:
    """The format version a model of this configuration is written with: 3 for 2D models, else 2."""
    return FORMAT_VERSION_2D if mc.variant == "2d" else FORMAT_VERSION


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


def axis_encoding(shape, n_freqs: int, device="cpu") -> torch.Tensor:
    """γ restricted to each axis of a grid `shape` (X, Y, Z): (X+Y+Z, 2L) float32.

    Row off_a + i (off = 0, X, X+Y) holds the 2L values γ(p)[a*2L : (a+1)*2L] of any voxel whose
    index on axis a is i. Computed by the very ops of voxel_coords + positional_encoding, so a
    point's γ gathered from these rows equals the reference's bit for bit. The fast backends
    read γ (or γ times a weight block) from this table instead of encoding every point.
    """
    shape = tuple(int(s) for s in shape)
    E2 = 2 * n_freqs
    rows = []
    for a, s in enumerate(shape):
        idx = torch.zeros(s, 3, dtype=torch.long, device=device)
        idx[:, a] = torch.arange(s, device=device)
        rows.append(positional_encoding(voxel_coords(idx, shape), n_freqs)[:, a * E2:(a + 1) * E2])
    return torch.cat(rows).contiguous()


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
        """z (N, D) float32 and enc (N, 6L) float32 (the positional encoding of N points) ->
        (N, C) float32 logits; [z, enc] is fed again beside layer latent_in's input."""
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
    latents: torch.Tensor           # (N_train, D) float32: one per volume (3d) or per brain slice (2d)
    train: cfg.TrainConfig | None = None
    info: dict | None = None
    source: str | None = None       # the file it was loaded from
    sha256: str | None = None       # of that file's bytes

    @property
    def config(self) -> cfg.ModelConfig:
        """The decoder's ModelConfig."""
        return self.decoder.config

    def to_payload(self) -> dict:
        """The file contents: JSON meta, decoder state dict, centres (C,) float64, latents (N, D) float32."""
        meta = dict(format=FORMAT, format_version=format_version(self.config),
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
    """The checked contents of a model file: {"meta": dict, "decoder", "centres", "latents"}.

    Adds "source" (the file's path) and "sha256" (of the bytes that were loaded).
    """
    import hashlib
    import io

    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise IfadError(f"{path}: no such model file; pass a model.pt file or a training run folder")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        from .io import describe_os_error
        raise IfadError(describe_os_error(exc, path)) from None
    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        meta = json.loads(payload["meta"])
    except Exception as exc:
        raise IfadError(f"{path}: not an ifad-fast model ({type(exc).__name__}: wrong, truncated or "
                        "foreign file); pass a model.pt written by 'ifad-fast train'") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IfadError(f"{path}: not an ifad-fast model file; pass a model.pt written by 'ifad-fast train'")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _damaged(path, f"format_version {version!r} is not a version number (1, 2, ...)")
    if version > FORMAT_VERSION_2D:
        raise IfadError(f"{path}: model format {meta['format_version']} is newer than this ifad-fast "
                        f"understands ({FORMAT_VERSION_2D}); upgrade ifad-fast")
    payload["meta"] = meta
    payload["source"] = str(path.resolve())
    payload["sha256"] = hashlib.sha256(raw).hexdigest()
    return payload


def _damaged(path, what: str) -> IfadError:
    return IfadError(f"{path}: damaged model file ({what}); retrain or re-download it")


def _typed_config(cls, data, path, section: str, required: bool):
    """A config dataclass from the meta section `data`, every field's type checked against its default.

    required: every field must be present (the decoder's shape depends on all of them); else
    missing fields take their defaults.
    """
    import dataclasses

    if not isinstance(data, dict):
        raise _damaged(path, f"meta field {section!r} is {type(data).__name__}, not a dict")
    for f in dataclasses.fields(cls):
        default = f.default
        if f.name not in data:
            if required:
                raise _damaged(path, f"meta field {section}.{f.name} is missing")
            continue
        v = data[f.name]
        if isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(default, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        elif isinstance(default, str):
            ok = isinstance(v, str)
        elif isinstance(default, tuple):
            ok = isinstance(v, (list, tuple))
        else:
            ok = True
        if not ok:
            raise _damaged(path, f"meta field {section}.{f.name} is {v!r}, expected a {type(default).__name__}")
    try:
        return cfg.from_dict(cls, data)
    except IfadError as exc:
        raise _damaged(path, f"meta field {section!r}: {exc}") from None
    except Exception as exc:
        raise _damaged(path, f"meta field {section!r}: {type(exc).__name__}") from None


def check_payload(payload: dict, path) -> tuple[cfg.ModelConfig, cfg.PreprocessConfig, cfg.TrainConfig | None]:
    """Validate a loaded model file before anything is allocated from it.

    Checks the meta sections and their field types, the decoder tensors' names and shapes against
    the configuration (so absurd sizes are refused without building them), finite weights,
    centres (one per class, finite, strictly increasing), latents (N, D), the grid resolution, the latent
    prior and a stored threshold. Returns the model, preprocess and train configurations.
    """
    from .limits import check_resolution

    meta = payload["meta"]
    for key in ("model", "preprocess"):
        if key not in meta:
            raise _damaged(path, f"meta field {key!r} is missing")
    for key in ("decoder", "centres", "latents"):
        if key not in payload:
            raise _damaged(path, f"no {key}")
    model_settings = meta["model"]
    if isinstance(model_settings, dict) and "variant" not in model_settings and meta.get("format_version", 1) < 3:
        model_settings = {**model_settings, "variant": "3d"}        # files before IF 2D
    mc = _typed_config(cfg.ModelConfig, model_settings, path, "model", required=True)
    if not (1 <= mc.latent_dim <= 4096 and 1 <= mc.hidden <= 16384 and 2 <= mc.n_layers <= 64
            and 0 <= mc.n_freqs <= 32 and 2 <= mc.n_classes <= 255 and 0 <= mc.dropout < 1):
        raise _damaged(path, f"implausible decoder sizes {cfg.to_dict(mc)}")
    pc = _typed_config(cfg.PreprocessConfig, preprocess_settings(meta), path, "preprocess", required=False)
    check_resolution(pc.resolution, str(path))
    if pc.standardise and not pc.landmarks:
        raise _damaged(path, "it standardises intensities but holds no landmarks")
    train = meta.get("train")
    tc = _typed_config(cfg.TrainConfig, train, path, "train", required=False) if train else None   # prior checked there
    info = meta.get("info", {})
    if not isinstance(info, dict):
        raise _damaged(path, "meta field 'info' is not a dict")
    thresholds = info.get("thresholds", {})
    if not isinstance(thresholds, dict) or not all(isinstance(k, str) for k in thresholds):
        raise _damaged(path, "meta field info.thresholds is not a dict of schedule names")
    for t in (info.get("threshold"), *thresholds.values()):
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)):
            raise _damaged(path, f"stored threshold {t!r} is not a finite number")

    decoder = payload["decoder"]
    if not isinstance(decoder, dict):
        raise _damaged(path, "the decoder weights are not a state dict")
    expected = {}
    for i, (o, n_in) in enumerate(layer_shapes(mc)):
        expected[f"layers.{i}.bias"] = (o,)
        expected[f"layers.{i}.parametrizations.weight.original0"] = (o, 1)
        expected[f"layers.{i}.parametrizations.weight.original1"] = (o, n_in)
    if set(decoder) != set(expected):
        raise _damaged(path, "decoder weights do not match its configuration")
    for name, shape in expected.items():
        t = decoder[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
            raise _damaged(path, f"decoder weight {name} has shape {tuple(getattr(t, 'shape', ()))}, "
                                 f"expected {shape}")
        if not torch.isfinite(t).all():
            raise _damaged(path, f"decoder weight {name} holds NaN or Inf")
    centres = payload["centres"]
    if not isinstance(centres, torch.Tensor) or centres.ndim != 1 or not centres.is_floating_point():
        raise _damaged(path, "the intensity centres are not a 1-D float tensor")
    if centres.numel() != mc.n_classes:
        raise _damaged(path, f"{centres.numel()} intensity centres for a decoder of {mc.n_classes} classes")
    if not torch.isfinite(centres).all() or (centres[1:] <= centres[:-1]).any():
        raise _damaged(path, "the intensity centres are not finite and strictly increasing (one per class)")
    latents = payload["latents"]
    if (not isinstance(latents, torch.Tensor) or latents.ndim != 2 or latents.shape[1] != mc.latent_dim
            or not torch.isfinite(latents).all()):
        raise _damaged(path, f"the training latents are not a finite (N, {mc.latent_dim}) tensor")
    return mc, pc, tc


def stored_threshold(model: Model, schedule: str | None = None, pools: tuple | None = None) -> float | None:
    """The decision threshold `model` stores for maps of `schedule` (info["thresholds"][schedule], chosen
    on that schedule's maps), else its one threshold (info["threshold"]), else None. pools: the maps'
    (min_pool, avg_pool); None as well when the thresholds were chosen on maps pooled otherwise
    (info["threshold_pools"], recorded by calibration)."""
    info = model.info or {}
    chosen_on = info.get("threshold_pools")
    if pools is not None and chosen_on is not None and tuple(chosen_on) != tuple(pools):
        return None
    t = (info.get("thresholds") or {}).get(schedule, info.get("threshold"))
    return None if t is None else float(t)


def load_model(path, device="cpu") -> Model:
    """Load and validate a model file (or run folder); IfadError for anything damaged or foreign."""
    payload = load_payload(path)
    mc, pc, train = check_payload(payload, payload["source"])
    decoder = Decoder(mc)
    decoder.load_state_dict(payload["decoder"])
    return Model(decoder=decoder.to(device).eval(), centres=payload["centres"].to(torch.float64),
                 preprocess=pc, latents=payload["latents"].to(torch.float32), train=train,
                 info=payload["meta"].get("info", {}), source=payload["source"], sha256=payload["sha256"])


def preprocess_settings(meta: dict):
    """The preprocess section of a model file's meta; format-version-1 files get their cube frame
    and upper-percentile normalisation, which they predate naming."""
    settings = meta["preprocess"]
    if isinstance(settings, dict) and meta.get("format_version", 1) < 2:
        settings = {**cfg.LEGACY_PREPROCESS, **settings}
    return settings


def bundled_model_path() -> Path:
    """Where the bundled default model lives inside the package."""
    return Path(__file__).parent / "data" / "default_model.pt"
