"""The device-resident restore (Restorer(pipeline="device")): the scan is copied to the device
once and prepared, restored, pooled and returned to its grid there. Run here on torch's CPU
device, with preprocessing's device kernels (the `torch_kernels` fixture), where it must give
what the host pipeline (NumPy, Numba, CPU draws) gives; its pieces are checked against their
host counterparts one by one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import AFFINE, base_seed, numpy_rng, random_model, seed_note, toy_scans

from ifad_fast import config as cfg
from ifad_fast import preprocess
from ifad_fast.api import Restorer
from ifad_fast.backends import Backend, TorchBackend, check_classes
from ifad_fast.errors import IfadError
from ifad_fast.backends.fast import FastBackend
from ifad_fast.preprocess import IntensityEncoder, normalise, percentiles_torch, prepare
from ifad_fast.restore import dilate, optimise_latents, postprocess
from ifad_fast.sampling import PointSampler

SCHEDULE = "6x400,3x900"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("frame, resolution", [("physical", None), ("physical", 26), ("cube", None)])
def test_device_pipeline_equals_the_host_pipeline(frame, resolution, torch_kernels):
    """Fresh random scans and model, a batch of two: classes bit for bit, maps to 1e-5."""
    model = random_model(base_seed() + 1, frame)
    imgs = toy_scans(2, offset=20)
    kw = dict(schedule=SCHEDULE, seed=base_seed() % 1000, resolution=resolution, brain_fraction=0.5)
    host = Restorer(model, "cpu", "cpu", pipeline="host", **kw)
    dev = Restorer(model, "cpu", "cpu", pipeline="device", **kw)
    assert (host.pipeline, host.adam, dev.pipeline, dev.adam) == ("host", "default", "device", "foreach")
    assert not dev.cuda_graphs                                # CUDA only
    for a, b in zip(host.restore_arrays(imgs, [AFFINE] * 2), dev.restore_arrays(imgs, [AFFINE] * 2)):
        np.testing.assert_array_equal(a.classes, b.classes, err_msg=seed_note())
        np.testing.assert_array_equal(a.model_grid.classes, b.model_grid.classes, err_msg=seed_note())
        np.testing.assert_array_equal(a.placement.brain, b.placement.brain)
        assert isinstance(b.placement.brain, np.ndarray) and b.anomaly.dtype == np.float32
        for x, y in ((a.anomaly, b.anomaly), (a.model_grid.anomaly, b.model_grid.anomaly),
                     (a.restoration, b.restoration), (a.model_grid.z, b.model_grid.z)):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=seed_note())
        np.testing.assert_allclose(b.model_grid.losses, a.model_grid.losses, rtol=1e-5)
        assert a.model_grid.scored_voxels == b.model_grid.scored_voxels
        assert a.anomaly.max() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 2, 3, 10, 997, 20000])
def test_torch_percentiles_are_numpys(n, device):
    rng = numpy_rng(n)
    values = rng.normal(300, 80, n)
    values[: n // 3] = np.round(values[: n // 3])              # ties
    q = (0.0, 2.0, 25.0, 50.0, 98.0, 100.0, float(rng.uniform(0, 100)))
    np.testing.assert_array_equal(percentiles_torch(torch.from_numpy(values).to(device), q).cpu().numpy(),
                                  np.percentile(values, q), err_msg=seed_note())
    # float32 voxels promoted to float64, as normalise does
    v32 = values.astype(np.float32)
    np.testing.assert_array_equal(percentiles_torch(torch.from_numpy(v32).to(device), q).cpu().numpy(),
                                  np.percentile(v32.astype(np.float64), q))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["minmax", "upper"])
def test_torch_normalisation_is_numpys(method, device, torch_kernels):
    rng = numpy_rng(5)
    data = np.where(rng.random((11, 13, 9)) < 0.6, rng.gamma(3.0, 100.0, (11, 13, 9)), 0).astype(np.float32)
    if method == "upper":
        data[data != 0] -= 150                                  # negative values: the min-max branch of 'upper'
    ref, (lo, hi) = normalise(data, (2.0, 98.0), method)
    out, (tlo, thi) = normalise(torch.from_numpy(data).to(device), (2.0, 98.0), method)
    assert (tlo, thi) == (lo, hi) and out.device.type == device
    np.testing.assert_array_equal(out.cpu().numpy(), ref)
    assert normalise(torch.from_numpy(data), (2.0, 98.0), method)[0].dtype == torch.float32
    for bad in (np.zeros((4, 4, 4), np.float32), np.full((4, 4, 4), 7.0, np.float32)):
        with pytest.raises(IfadError):
            normalise(torch.from_numpy(bad))


@pytest.mark.parametrize("kernels", ["numpy", "torch"])
@pytest.mark.parametrize("frame, region, landmarks", [("physical", "interior", (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)),
                                                     ("cube", "brain", ())])
def test_a_cpu_tensor_is_prepared_as_its_array_is(kernels, frame, region, landmarks, monkeypatch):
    """prepare of a CPU tensor, on its NumPy view (the default) or by the device kernels: tensors
    out, the host's numbers bit for bit, and back to the scan's grid the same."""
    monkeypatch.setattr(preprocess, "CPU_TENSOR_KERNELS", kernels)
    img = toy_scans(1, offset=30)[0]
    enc = IntensityEncoder(np.linspace(0.0, 1.0, 8))
    pc = cfg.PreprocessConfig(resolution=24, frame=frame, percentile_region=region, standardise=bool(landmarks),
                              landmarks=landmarks)
    host, dev = prepare(img, enc, pc, 3, AFFINE), prepare(torch.from_numpy(img), enc, pc, 3, AFFINE)
    assert isinstance(host.classes, np.ndarray) and isinstance(host.brain, np.ndarray)
    assert all(isinstance(x, torch.Tensor) for x in (dev.normalised, dev.classes, dev.brain))
    assert dev.percentiles == host.percentiles
    for a, b in ((host.normalised, dev.normalised), (host.classes, dev.classes), (host.brain, dev.brain)):
        np.testing.assert_array_equal(b.numpy(), a)
    back = dev.placement.to_native(dev.classes, mode="nearest")
    assert isinstance(back, torch.Tensor) and back.dtype == torch.uint8
    np.testing.assert_array_equal(back.numpy(), host.placement.to_native(host.classes, mode="nearest"))
    np.testing.assert_array_equal(enc.decode(dev.classes).numpy(), enc.decode(host.classes))


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_on_a_device_generator_draws_inside_the_brain(device):
    shape, k, fraction = (10, 11, 12), 2000, 0.75
    focus = torch.zeros(2, *shape, dtype=torch.bool)
    focus[0, 2:5, 3:6, 4:9] = True
    focus[1, 7:, :, :2] = True
    sampler = PointSampler(shape, focus.to(device), fraction)
    gen = torch.Generator(device).manual_seed(base_seed())
    rows = torch.tensor([1, 0], device=device)
    idx, lin = sampler.draw(rows, k, gen)
    assert idx.device.type == lin.device.type == device and idx.shape == (2, k, 3)
    idx, lin = idx.cpu(), lin.cpu()
    assert (idx >= 0).all() and (idx < torch.tensor(shape)).all()
    assert torch.equal((idx[..., 0] * shape[1] + idx[..., 1]) * shape[2] + idx[..., 2], lin)
    inside = focus.reshape(2, -1)[torch.tensor([1, 0])[:, None], lin]
    n_focus = round(fraction * k)
    assert inside[:, :n_focus].all()
    share = focus.reshape(2, -1).float().mean(1)[torch.tensor([1, 0])]   # the rest: uniform over the grid
    assert ((inside[:, n_focus:].float().mean(1) - share).abs() < 0.1).all(), seed_note()
    if device == "cpu":                     # the host sampler with the same seed draws the same points
        host_idx, _ = PointSampler(shape, focus, fraction).draw(torch.tensor([1, 0]), k,
                                                                torch.Generator().manual_seed(base_seed()))
        assert torch.equal(host_idx, idx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reach", [0, 1, 3, 8])
def test_dilate_is_scipys_maximum_filter(reach, device):
    from scipy.ndimage import maximum_filter

    rng = numpy_rng(reach)
    mask = rng.random((17, 23, 12)) < 0.02
    ref = maximum_filter(mask, size=2 * reach + 1, mode="constant", cval=False) if reach else mask
    np.testing.assert_array_equal(dilate(torch.from_numpy(mask).to(device), reach).cpu().numpy(), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_postprocess_of_a_tensor_stays_on_its_device_and_equals_the_array_path(device):
    x = torch.from_numpy(numpy_rng(3).random((19, 15, 21)).astype(np.float32))
    out = postprocess(x.to(device), 3, 7)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device.type == device
    ref = postprocess(x.numpy(), 3, 7)
    if device == "cpu":
        np.testing.assert_array_equal(out.numpy(), ref)
    else:                                   # float64 prefix sums summed in another order
        np.testing.assert_allclose(out.cpu().numpy(), ref, rtol=1e-5, atol=1e-6)


def test_restoration_checks_the_classes_once_and_skips_per_call_checks(monkeypatch):
    """Internal calls pass checked=True: the backend's per-call range check (a host read per
    call on a GPU) never runs during a restoration; the classes are checked at its entry."""
    model = random_model(base_seed() + 2)
    cls = torch.from_numpy(numpy_rng(1).integers(0, model.config.n_classes, (1, 9, 8, 7)).astype(np.uint8))
    engine = FastBackend(model.decoder, "cpu")
    rc = cfg.RestoreConfig(phases=((3, 50),), prior="none")

    def no_check(*args, **kwargs):
        raise AssertionError("per-call check ran")
    monkeypatch.setattr(Backend, "_check", no_check)
    z, trace = optimise_latents(engine, cls, torch.zeros(1, model.config.latent_dim), rc, torch.Generator())
    assert trace.shape == (3, 1) and torch.isfinite(trace).all() and trace.device == cls.device
    bad = cls.clone()
    bad[0, 1, 2, 3] = model.config.n_classes
    with pytest.raises(IfadError, match="class ids in 0..5"):
        optimise_latents(engine, bad, torch.zeros(1, model.config.latent_dim), rc, torch.Generator())
    monkeypatch.undo()
    with pytest.raises(IfadError):              # a direct caller still gets the per-call checks
        engine.mean_loss(torch.zeros(1, model.config.latent_dim), torch.full((1, 4, 3), 99), torch.zeros(1, 4,
                         dtype=torch.long), (9, 8, 7))
    with pytest.raises(IfadError, match="integer class ids"):
        check_classes(cls.float(), 6)


def test_pipeline_choice_is_checked():
    model = random_model(base_seed())
    with pytest.raises(IfadError, match="pipeline must be one of"):
        Restorer(model, device="cpu", pipeline="gpu")
    assert Restorer(model, device="cpu").pipeline == "host"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine: CUDA graphs need one")
def test_graph_captured_steps_equal_eager_steps(monkeypatch):
    """The same fused Adam run eagerly and replayed from per-phase CUDA graphs; a capture that
    fails falls back to eager steps with a warning and the same result."""
    model = random_model(base_seed() + 3)
    dev = torch.device("cuda")
    cls = torch.from_numpy(numpy_rng(2).integers(0, model.config.n_classes, (2, 12, 11, 10)).astype(np.uint8)).to(dev)
    rc = cfg.RestoreConfig(phases=((8, 300), (6, 500)), lr=1e-2, lr_decay=0.5, prior="paper", sigma=0.5)
    engine = FastBackend(model.decoder, dev)
    z0 = torch.randn(2, model.config.latent_dim, device=dev) * 0.1

    def run(graphs):
        return optimise_latents(engine, cls, z0, rc, torch.Generator(dev).manual_seed(1), adam="fused", graphs=graphs)
    eager, graphed = run(False), run(True)
    torch.testing.assert_close(graphed[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(graphed[1], eager[1], rtol=1e-5, atol=1e-6)

    def no_capture(*args, **kwargs):
        raise RuntimeError("capture refused")
    monkeypatch.setattr(torch.cuda, "graph", no_capture)
    with pytest.warns(RuntimeWarning, match="capture refused"):
        fallback = run(True)
    torch.testing.assert_close(fallback[0], eager[0], rtol=1e-5, atol=1e-6)
    # the reference backend is not graph-safe (it copies coordinates from the host): never captured
    optimise_latents(TorchBackend(model.decoder, dev), cls, z0, rc, torch.Generator(dev), graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine: the CUDA pipeline needs one")
def test_cuda_pipeline_prepares_like_the_host_and_runs():
    """On CUDA the points come from the GPU's generator (other draws than the CPU's), so the whole
    restore is not compared number for number; the preparation is (same classes but for voxels
    whose trilinear value rounds differently), and the pipeline runs end to end."""
    from ifad_fast.preprocess import IntensityEncoder, prepare

    model = random_model(base_seed() + 4)
    img = toy_scans(1, offset=30)[0]
    enc, pc = IntensityEncoder(model.centres.numpy()), model.preprocess
    host = prepare(img, enc, pc, 3, AFFINE)
    dev = prepare(torch.from_numpy(img).cuda(), enc, pc, 3, AFFINE)
    assert dev.classes.is_cuda and host.percentiles == dev.percentiles
    np.testing.assert_allclose(dev.normalised.cpu().numpy(), host.normalised, rtol=0, atol=1e-5)
    assert (dev.classes.cpu().numpy() == host.classes).mean() > 0.99
    r = Restorer(model, "cpu", "cuda", schedule=SCHEDULE, seed=1, time_stages=True)
    assert r.pipeline == "device" and r.adam == "fused" and r.cuda_graphs
    res = r.restore_array(img, AFFINE)
    assert res.anomaly.shape == img.shape and np.isfinite(res.anomaly).all() and res.anomaly.max() > 0
    assert set(res.stages) == {"prepare", "search", "grid", "post", "native"}
