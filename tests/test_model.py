import json
import math

import pytest
import torch

from ifad_fast import config as cfg
from ifad_fast.errors import IfadError
from ifad_fast.model import (Decoder, Model, load_model, positional_encoding, save_model, voxel_coords)


def randomise_gains(decoder):
    """Give weight norm's g random values so folding it in matters."""
    with torch.no_grad():
        for layer in decoder.layers:
            g = layer.parametrizations.weight.original0
            g.copy_(torch.rand_like(g) + 0.5)


def test_paper_architecture_shapes_and_size():
    d = Decoder(cfg.ModelConfig())
    weights = sum(layer.weight.numel() + layer.bias.numel() for layer in d.layers)
    assert 1.8e6 < weights < 1.9e6
    shapes = [tuple(layer.weight.shape) for layer in d.layers]
    assert shapes[0] == (512, 316) and shapes[3] == (196, 512) and shapes[4] == (512, 512)
    assert shapes[-1] == (10, 512) and len(shapes) == 9
    z, enc = torch.randn(7, 256), torch.randn(7, 60)
    assert d(z, enc).shape == (7, 10)


def test_positional_encoding_formula():
    p = torch.rand(5, 3) * 2 - 1
    enc = positional_encoding(p, 4)
    assert enc.shape == (5, 24)
    for c in range(3):
        for k in range(4):
            torch.testing.assert_close(enc[:, c * 8 + 2 * k], torch.sin(2 ** k * math.pi * p[:, c]))
            torch.testing.assert_close(enc[:, c * 8 + 2 * k + 1], torch.cos(2 ** k * math.pi * p[:, c]))


def test_voxel_coords_corners():
    idx = torch.tensor([[0, 0, 0], [9, 4, 6]])
    torch.testing.assert_close(voxel_coords(idx, (10, 5, 7)), torch.tensor([[-1.0, -1, -1], [1, 1, 1]]))


@pytest.mark.parametrize("mc", [cfg.ModelConfig(), cfg.get_preset("tiny").model,
                                cfg.ModelConfig(latent_dim=8, hidden=48, n_layers=5, latent_in=3, n_freqs=3)])
def test_folded_equals_weight_normed(mc):
    d = Decoder(mc).eval()
    randomise_gains(d)
    z, enc = torch.randn(33, mc.latent_dim), torch.randn(33, 6 * mc.n_freqs)
    ref, fold = d(z, enc), d.folded()(z, enc)
    assert torch.isfinite(ref).all()
    assert ((fold - ref).norm() / ref.norm()).item() < 1e-5


def test_dropout_only_in_training():
    d = Decoder(cfg.ModelConfig(latent_dim=8, hidden=64, n_layers=4, latent_in=2, n_freqs=2, dropout=0.5))
    z, enc = torch.randn(50, 8), torch.randn(50, 12)
    d.eval()
    torch.testing.assert_close(d(z, enc), d(z, enc))
    d.train()
    assert not torch.equal(d(z, enc), d(z, enc))


def _model():
    mc = cfg.get_preset("tiny").model
    return Model(Decoder(mc).eval(), torch.linspace(0, 1, mc.n_classes, dtype=torch.float64),
                 cfg.PreprocessConfig(resolution=24), torch.randn(3, mc.latent_dim), cfg.TrainConfig())


def test_checkpoint_round_trip(tmp_path):
    m = _model()
    randomise_gains(m.decoder)
    path = save_model(m, tmp_path / "model.pt")
    back = load_model(tmp_path)  # a run folder works too
    z, enc = torch.randn(4, 16), torch.randn(4, 24)
    torch.testing.assert_close(back.decoder(z, enc), m.decoder(z, enc))
    torch.testing.assert_close(back.latents, m.latents)
    assert back.preprocess.resolution == 24 and back.train.prior == "paper"
    assert path.stat().st_size > 0


def test_bad_model_files_give_clear_errors(tmp_path):
    good = save_model(_model(), tmp_path / "model.pt")
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:200])
    (tmp_path / "text.pt").write_text("not a model")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    for name in ("trunc.pt", "text.pt", "foreign.pt", "missing.pt"):
        with pytest.raises(IfadError) as info:
            load_model(tmp_path / name)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("change, message", [
    (dict(hidden=10 ** 6), "implausible decoder sizes"),
    (dict(hidden=4096), "does not match its configuration|has shape"),
    (dict(n_classes=True), "expected a int"),
])
def test_model_file_validated_before_anything_is_built(tmp_path, change, message):
    mc = cfg.get_preset("tiny").model
    model = Model(decoder=Decoder(mc), centres=torch.linspace(0, 1, mc.n_classes, dtype=torch.float64),
                  preprocess=cfg.PreprocessConfig(resolution=24), latents=torch.zeros(2, mc.latent_dim))
    path = save_model(model, tmp_path / "m.pt")
    assert load_model(path).sha256 and load_model(path).source == str(path.resolve())
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["meta"])
    meta["model"].update(change)
    payload["meta"] = json.dumps(meta)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(IfadError, match=message):
        load_model(tmp_path / "bad.pt")
