"""The backend contract (ifad_fast/backends/base.py): one set of input checks, precision names and
cache policy for every backend; and the choice of backend (ifad_fast/backends/factory.py). Numbers are
compared in test_fast_backend.py (cpu vs torch) and test_triton_kernels.py (triton,
interpreted); this file checks what the contract promises.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from helpers import base_seed, random_batch, random_decoder, rel

from ifad_fast import config as cfg
from ifad_fast.backends import Backend, BoundedCache, TorchBackend, parse_precision
from ifad_fast.backends.factory import auto_backend, make_backend
from ifad_fast.errors import IfadError
from ifad_fast.backends.fast import FastBackend
from ifad_fast.model import axis_encoding, positional_encoding, voxel_coords

MC = cfg.ModelConfig(latent_dim=8, hidden=48, n_layers=3, latent_in=1, n_freqs=3, n_classes=5)
SHAPE = (6, 7, 5)


def backends():
    dec = random_decoder(MC, base_seed())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # bf16 on a CPU without native bf16
        return [TorchBackend(dec), FastBackend(dec, "cpu", "float32", chunk=7), FastBackend(dec, "cpu", "bf16")]


def test_precision_names():
    assert parse_precision("float32") == parse_precision("fp32") == "float32"
    assert parse_precision("bf16") == parse_precision("bfloat16") == "bf16"
    with pytest.raises(IfadError, match="unknown precision"):
        parse_precision("float16")
    with pytest.raises(IfadError, match="float32 only"):
        parse_precision("bf16", ("float32",), "the torch backend")
    dec = random_decoder(MC, base_seed())
    with pytest.raises(IfadError):
        TorchBackend(dec, "cpu", "bf16")
    with pytest.raises(IfadError):
        make_backend("cpu", dec, "cpu", "half")
    assert FastBackend(dec, "cpu", "fp32").precision == "float32"


def test_bounded_cache_keeps_the_most_recently_used():
    cache, made = BoundedCache(2), []

    def make(k):
        return lambda: made.append(k) or k * 10
    assert cache.get(1, make(1)) == 10 and cache.get(2, make(2)) == 20
    assert cache.get(1, make(1)) == 10                 # hit: 1 is now the most recent
    cache.get(3, make(3))                              # evicts 2, the least recently used
    assert len(cache) == 2 and made == [1, 2, 3]
    cache.get(1, make(1))
    cache.get(2, make(2))
    assert made == [1, 2, 3, 2]


def test_per_shape_caches_are_bounded():
    fast = backends()[1]
    z, idx, targets = random_batch(MC, (3, 3, 3), 1, 5, base_seed())
    for s in range(3, 15):
        fast.score(z[0], idx[0], targets[0], (s, 3, 3))
    assert len(fast._tables) == 8


@pytest.mark.parametrize("which", [0, 1, 2], ids=["torch", "cpu float32", "cpu bf16"])
def test_every_backend_refuses_the_same_bad_inputs(which):
    b = backends()[which]
    z, idx, targets = random_batch(MC, SHAPE, 2, 11, base_seed())
    b.mean_loss(z, idx, targets, SHAPE)                 # the valid call works
    bad_idx, bad_high, bad_tgt = idx.clone(), idx.clone(), targets.clone()
    bad_idx[1, 3, 2] = -1
    bad_high[0, 0, 1] = SHAPE[1]
    bad_tgt[0, 4] = MC.n_classes
    for args in [(z[:, :-1], idx, targets, SHAPE),            # wrong latent size
                 (z, idx[:1], targets, SHAPE),                # batch sizes disagree
                 (z, idx[:, :0], targets[:, :0], SHAPE),      # K = 0
                 (z, bad_idx, targets, SHAPE), (z, bad_high, targets, SHAPE),
                 (z, idx, bad_tgt, SHAPE),
                 (z, idx.float(), targets, SHAPE),
                 (z, idx, targets, SHAPE[:2]), (z, idx, targets, (0, 7, 5))]:
        with pytest.raises(IfadError):
            b.mean_loss(*args)
    with pytest.raises(IfadError):
        b.score(z[0], idx, targets, SHAPE)                     # batched inputs to score
    with pytest.raises(IfadError):
        b.score(z[0], bad_high[0], targets[0], SHAPE)
    with pytest.raises(IfadError):
        b.score(z[0], idx[0], targets[0], SHAPE, out=torch.empty(3))


@pytest.mark.parametrize("which", [0, 1], ids=["torch", "cpu float32"])
def test_score_contract(which):
    b = backends()[which]
    seed = base_seed()
    z, idx, targets = random_batch(MC, SHAPE, 1, 23, seed)
    s = b.score(z[0], idx[0], targets[0], SHAPE)
    out = torch.full((23,), float("nan"))
    assert b.score(z[0], idx[0], targets[0], SHAPE, out=out) is out and torch.equal(out, s)
    ce, cls = b.score_and_classes(z[0], idx[0], targets[0], SHAPE)
    assert s.dtype == ce.dtype == torch.float32 and cls.dtype == torch.uint8 and cls.shape == (23,)
    assert rel(ce, s) <= 1e-6, (seed, rel(ce, s))
    e, ec = b.score_and_classes(z[0], idx[0, :0], targets[0, :0], SHAPE)
    assert e.shape == ec.shape == (0,) and ec.dtype == torch.uint8
    assert isinstance(b, Backend)


def test_axis_encoding_rows_are_the_reference_encoding():
    shape, L = (4, 9, 2), 5
    tab = axis_encoding(shape, L)
    assert tab.shape == (15, 10) and tab.dtype == torch.float32
    idx = torch.stack(torch.meshgrid(*(torch.arange(s) for s in shape), indexing="ij"), -1).reshape(-1, 3)
    gathered = torch.cat([tab[idx[:, 0]], tab[4 + idx[:, 1]], tab[13 + idx[:, 2]]], -1)
    assert torch.equal(gathered, positional_encoding(voxel_coords(idx, shape), L))   # bit for bit


# --------------------------------------------------------------------------- auto policy, tf32, triton gate


def test_tf32_is_a_cuda_precision_refused_elsewhere(tmp_path, capsys):
    dec = random_decoder(MC, base_seed())
    assert parse_precision("tf32") == "tf32"
    with pytest.raises(IfadError, match="TF32 tensor cores of a CUDA GPU.*--precision float32"):
        FastBackend(dec, "cpu", "tf32")
    with pytest.raises(IfadError, match="TF32"):
        make_backend("auto", dec, "cpu", "tf32")
    with pytest.raises(IfadError, match="float32 only; use --backend cpu for tf32"):
        TorchBackend(dec, "cpu", "tf32")
    from ifad_fast.cli import main
    assert main(["restore", str(tmp_path / "scan.nii.gz"), "-o", str(tmp_path / "out"), "--device", "cpu",
                 "--precision", "tf32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tf32" in err[0] and "CUDA" in err[0]


def test_auto_picks_the_cpu_backend_off_cuda():
    dec = random_decoder(MC, base_seed())
    for precision in ("float32", "bf16", "fp32"):
        assert auto_backend(MC, "cpu", precision) == "cpu"
    assert isinstance(make_backend("auto", dec, "cpu"), FastBackend)


@pytest.fixture
def pretend_cuda(monkeypatch):
    """A pretended CUDA GPU of compute capability cc (set `pretend_cuda(cc)`) on which the triton
    backend could run: enough to reach the hardware gate, which acts before any GPU work."""
    pytest.importorskip("triton", reason="triton is not installed: the gate names triton's GPU families")
    import ifad_fast.backends.factory as engines
    import ifad_fast.backends.triton as tb

    def set_cc(cc):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: divmod(cc, 10))
        monkeypatch.setattr(engines, "_triton_usable", lambda device: torch.device(device).type == "cuda")
        monkeypatch.setattr(tb, "triton_unavailable_reason", lambda device: None)
    return set_cc


def test_auto_picks_triton_only_for_hardware_checked_bf16(pretend_cuda):
    paper, small = cfg.ModelConfig(), cfg.get_preset("small").model
    pretend_cuda(90)
    assert auto_backend(paper, "cuda", "bf16") == "triton"
    assert auto_backend(cfg.ModelConfig(latent_dim=16), "cuda", "bfloat16") == "triton"
    assert auto_backend(paper, "cuda", "float32") == "cpu"      # triton float32 measured slower than torch
    assert auto_backend(paper, "cuda", "tf32") == "cpu"
    assert auto_backend(small, "cuda", "bf16") == "cpu"         # latent_dim 64: a wrong z-gradient on an H200
    pretend_cuda(80)
    assert auto_backend(paper, "cuda", "bf16") == "cpu"         # never checked on an A100-class GPU


def test_triton_bf16_refuses_shapes_not_checked_on_hardware(pretend_cuda):
    from ifad_fast.model import Decoder
    from ifad_fast.backends.triton import HARDWARE_CHECKED, TritonBackend, hardware_check_error, hardware_key

    small = cfg.get_preset("small").model
    pretend_cuda(90)
    with pytest.raises(IfadError, match="has not been checked on this GPU.*latent_dim 64.*--backend cpu.*float32"):
        TritonBackend(Decoder(small), torch.device("cuda", 0), "bf16")
    assert hardware_check_error(small, "cuda", "float32") is None        # float32 is not gated
    assert hardware_check_error(small, "cpu", "bf16") is None            # the interpreter is a check itself
    assert hardware_key(cfg.ModelConfig(), 90, "bf16") in HARDWARE_CHECKED
    assert hardware_check_error(cfg.ModelConfig(), "cuda", "bf16", cc=86) is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine: tf32 needs one")
def test_tf32_is_gated_against_float32_on_cuda():
    dec = random_decoder(MC, base_seed())
    z, idx, targets = random_batch(MC, SHAPE, 2, 401, base_seed())
    z, idx, targets = z.cuda(), idx.cuda(), targets.cuda()
    before = torch.get_float32_matmul_precision()
    ref = FastBackend(dec, "cuda", "float32").mean_loss(z, idx, targets, SHAPE)
    got = FastBackend(dec, "cuda", "tf32").mean_loss(z, idx, targets, SHAPE)
    assert torch.get_float32_matmul_precision() == before                 # scoped to the call
    assert rel(got, ref) < 1e-2, (base_seed(), rel(got, ref))


def test_a_backend_missing_a_kernel_cannot_be_built():
    """Backend's three kernels are abstract: a subclass without _score_and_classes fails at construction."""

    class Partial(Backend):
        name = "partial"

        def _mean_loss(self, z, idx, targets, shape):
            return z.sum(1)

        def _score(self, z, idx, targets, shape, out):
            return torch.zeros(idx.shape[0])

    with pytest.raises(TypeError, match="_score_and_classes"):
        Partial(random_decoder(cfg.ModelConfig(latent_dim=8, hidden=32, n_layers=3, latent_in=1, n_freqs=2), 0))
