"""Typed configuration: the choice fields are Literals checked when a config is built."""
from __future__ import annotations

import dataclasses
import json
import typing

import numpy as np
import pytest

from ifad_fast import config as cfg
from ifad_fast.errors import IfadError


@pytest.mark.parametrize("cls, field, choices", [
    (cfg.TrainConfig, "prior", ("paper", "reference", "none")),
    (cfg.RestoreConfig, "prior", ("paper", "none")),
    (cfg.RestoreConfig, "init", ("random", "mean")),
])
def test_choice_fields_accept_their_values_and_name_them_on_a_typo(cls, field, choices):
    for value in choices:
        assert getattr(cls(**{field: value}), field) == value
    with pytest.raises(IfadError) as err:
        cls(**{field: choices[0].upper()})
    assert all(v in str(err.value) for v in choices) and field in str(err.value)
    with pytest.raises(IfadError):                       # replace() and from_dict() check too
        dataclasses.replace(cls(), **{field: "typo"})
    with pytest.raises(IfadError):
        cfg.from_dict(cls, {field: "typo"})


def test_named_schedules_and_presets_are_valid_and_survive_a_model_file():
    """Every named schedule and preset builds (its checks pass), has positive steps and points, and
    comes back equal from the dicts a model file stores (tuples restored from JSON lists)."""
    for name, schedule in cfg.SCHEDULES.items():
        rc = cfg.RestoreConfig(**schedule)
        assert rc.phases and all(steps > 0 and points > 0 for steps, points in rc.phases), name
        assert cfg.from_dict(cfg.RestoreConfig, json.loads(json.dumps(cfg.to_dict(rc)))) == rc, name
    for name, preset in cfg.PRESETS.items():
        for section in (preset.model, preset.preprocess, preset.train):
            stored = json.loads(json.dumps(dataclasses.asdict(section)))
            assert cfg.from_dict(type(section), stored) == section, (name, type(section).__name__)


def _choices(parser, command: str, option: str) -> tuple:
    """The `choices` of `option` of the CLI's `command`."""
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return tuple(next(a for a in sub._actions if option in a.option_strings).choices)


def test_one_list_of_precisions():
    """config.PRECISIONS is the one list: the CLI's choices, the backends' dtypes and who runs what,
    each backend's precisions and training's are read from it (subsets in its order)."""
    from ifad_fast import cli, train
    from ifad_fast.backends.base import OPERAND_DTYPES, RUNS, TorchBackend, parse_precision
    from ifad_fast.backends.fast import FastBackend
    from ifad_fast.backends.triton import TritonBackend

    assert cfg.PRECISIONS == ("float32", "bf16", "tf32") == tuple(OPERAND_DTYPES) == tuple(RUNS)
    parser = cli.build_parser()
    assert _choices(parser, "restore", "--precision") == cfg.PRECISIONS
    assert _choices(parser, "train", "--precision") == cfg.TRAIN_PRECISIONS == ("float32", "bf16")
    for cls in (TorchBackend, FastBackend, TritonBackend):
        assert cls.precisions == tuple(p for p in cfg.PRECISIONS if cls.name in RUNS[p]), cls.name
    assert (TorchBackend.precisions, FastBackend.precisions, TritonBackend.precisions) == \
        (("float32",), cfg.PRECISIONS, ("float32", "bf16"))
    for alias, name in cfg.PRECISION_ALIASES.items():
        assert name in cfg.PRECISIONS and parse_precision(alias) == name
    assert not hasattr(train, "PRECISIONS")


@pytest.mark.parametrize("cls, changes, message", [
    (cfg.RestoreConfig, dict(seed=-1), f"seed must be a whole number from 0 to {2 ** 63 - 1}, got -1"),
    (cfg.RestoreConfig, dict(seed=2 ** 63), "seed must be a whole number from 0"),
    (cfg.RestoreConfig, dict(seed=True), "seed must be a whole number from 0"),
    (cfg.RestoreConfig, dict(phases=((700, 1 << 23),)), "schedule: 8,388,608 points per step is more than the limit"),
    (cfg.RestoreConfig, dict(phases=((10 ** 6, 1 << 20),)), "points in all (steps x points) is more than the limit"),
    (cfg.RestoreConfig, dict(phases=()), "RestoreConfig.phases must be (steps, points) pairs"),
    (cfg.RestoreConfig, dict(phases=((0, 100),)), "RestoreConfig.phases must be (steps, points) pairs"),
    (cfg.RestoreConfig, dict(phases=((100,),)), "RestoreConfig.phases must be (steps, points) pairs"),
    (cfg.RestoreConfig, dict(phases=((100, 2.5),)), "RestoreConfig.phases must be (steps, points) pairs"),
    (cfg.TrainConfig, dict(epochs=0), "train setting epochs must be a whole number of at least 1, got 0"),
    (cfg.TrainConfig, dict(volumes_per_batch=1.5), "train setting volumes_per_batch must be a whole number"),
    (cfg.TrainConfig, dict(points_per_volume=-3), "train setting points_per_volume must be a whole number"),
    (cfg.TrainConfig, dict(checkpoint_every=False), "train setting checkpoint_every must be a whole number"),
    (cfg.TrainConfig, dict(seed=2 ** 32), f"seed must be a whole number from 0 to {2 ** 32 - 1}, got {2 ** 32}"),
    (cfg.TrainConfig, dict(seed=-1), "seed must be a whole number from 0"),
    (cfg.TrainConfig, dict(augment=("blur",)), "TrainConfig.augment must name each of contrast, bias, noise, deform"),
])
def test_configs_check_their_settings_when_built(cls, changes, message):
    """Every check of a restore or training setting runs when its config is built (directly, by
    replace() or from a stored dict), with the message the command line shows."""
    for build in (lambda: cls(**changes), lambda: dataclasses.replace(cls(), **changes),
                  lambda: cfg.from_dict(cls, changes)):
        with pytest.raises(IfadError) as err:
            build()
        assert message in str(err.value)


def test_configs_take_their_extremes():
    import numpy as np

    assert cfg.RestoreConfig(seed=2 ** 63 - 1, phases=[[1, 1 << 22]]).seed == 2 ** 63 - 1
    assert cfg.RestoreConfig(phases=((np.int64(5), np.int32(64)),)).phases[0] == (5, 64)
    assert cfg.TrainConfig(seed=cfg.MAX_SEED, epochs=1, checkpoint_every=1).seed == 2 ** 32 - 1
    assert typing.get_args(cfg.AugmentKind) == cfg.AUGMENT_KINDS


def test_one_list_of_regions():
    from ifad_fast import cli

    assert cfg.REGIONS == ("brain", "full") == _choices(cli.build_parser(), "restore", "--region")
    assert [cfg.check_region(r) for r in cfg.REGIONS] == list(cfg.REGIONS)
    with pytest.raises(IfadError, match="region must be brain or full, got 'skull'"):
        cfg.check_region("skull")


def test_the_pools_are_the_papers_millimetres_on_any_grid():
    """frame_pools: the paper's 3 and 15 voxels of 1.5 mm (4.5 and 22.5 mm) as the nearest odd windows of
    a physical frame's voxels; a cube frame, whose voxels have no set size, keeps the voxel counts."""
    def pools(**pc):
        return tuple(cfg.frame_pools(cfg.PreprocessConfig(**pc)).values())

    assert pools(resolution=160, extent_mm=240.0) == (3, 15)          # the paper preset: the paper's
    assert tuple(cfg.frame_pools(cfg.get_preset("paper").preprocess).values()) == (3, 15)
    assert tuple(cfg.frame_pools(cfg.get_preset("small").preprocess).values()) == (1, 9)    # 2.33 mm
    assert tuple(cfg.frame_pools(cfg.get_preset("tiny").preprocess).values()) == (1, 3)     # 8 mm
    assert pools(resolution=120, extent_mm=120.0) == (5, 23)         # 1 mm: 4.5 -> 5, 22.5 -> 23 (odd)
    assert pools(resolution=96, extent_mm=224.0, frame="cube") == (3, 15)
    for size in np.linspace(0.1, 40.0, 400):                           # the nearest odd window, at least 1
        w = cfg.odd_window(size)
        assert w % 2 == 1 and w >= 1
        assert abs(w - size) <= min(abs(o - size) for o in range(1, 45, 2)) + 1e-9 or w == 1


def test_restore_config_takes_the_frames_pools_and_the_paper_protocol_the_papers_voxels(tmp_path, capsys,
                                                                                        monkeypatch):
    from helpers import AFFINE, cli, random_model, scan, toy_scans

    from ifad_fast.api import Restorer, restore_config
    from ifad_fast.model import save_model

    model = random_model(0)
    expected = cfg.frame_pools(model.preprocess)
    rc = restore_config(model, "fast")
    assert (rc.min_pool, rc.avg_pool) == tuple(expected.values())
    assert restore_config(model, "fast", avg_pool=7).avg_pool == 7
    res = Restorer(model, "torch", "cpu", schedule=cfg.replace(rc, phases=((3, 128),))).restore_array(
        toy_scans(1)[0], AFFINE)
    from ifad_fast.restore.scoring import postprocess
    np.testing.assert_allclose(res.model_grid.anomaly * (res.placement.brain),
                               postprocess(res.model_grid.score, rc.min_pool, rc.avg_pool) * res.placement.brain,
                               rtol=1e-6, atol=1e-6)
    assert tuple(expected.values()) != (3, 15)
    monkeypatch.setitem(cfg.SCHEDULES, "paper", dict(cfg.SCHEDULES["paper"], phases=((3, 128),)))   # fast here
    path = save_model(model, tmp_path / "m.pt")
    src = scan(tmp_path / "in", "case")
    runs = (([], cfg.frame_pools(model.preprocess)), (["--protocol", "paper"], dict(min_pool=3, avg_pool=15)),
            (["--pools", "3x5"], dict(min_pool=3, avg_pool=5)))
    for i, (extra, pools) in enumerate(runs):
        out = tmp_path / f"out{i}"
        code, _, err = cli(capsys, "restore", src, "-m", path, "-o", out, "--backend", "torch", "--device", "cpu",
                           "--seed", "1", *extra, "-q")
        assert code == 0, err
        summary = json.loads((out / "case_restore.json").read_text())
        restore = summary["restore"]
        assert (restore["min_pool"], restore["avg_pool"]) == (pools["min_pool"], pools["avg_pool"]), summary
    from helpers import one_error_line
    code, _, err = cli(capsys, "restore", src, "-m", path, "-o", tmp_path / "x", "--protocol", "paper", "--pools", "1x9")
    assert code == 2 and "drop --pools" in one_error_line(err, "restore") and not (tmp_path / "x").exists()
    code, _, err = cli(capsys, "restore", src, "-m", path, "-o", tmp_path / "x", "--pools", "2x9")
    assert code == 2 and "odd" in err and not (tmp_path / "x").exists()


def test_the_protocols_baselines_keep_the_papers_voxel_pools():
    """bench accuracy post-processes the voxel-wise baselines with 3 x 15 voxels (BASELINE_POOLS), whatever
    pools the restorer takes."""
    from types import SimpleNamespace

    from helpers import AFFINE, random_model, toy_scans

    from ifad_fast.api import Restorer
    from ifad_fast.baselines import anomaly_map
    from ifad_fast.benchmarks.accuracy import BASELINE_POOLS, _methods

    model = random_model(0)
    restorer = Restorer(model, "torch", "cpu", schedule="fast")
    assert (restorer.rc.min_pool, restorer.rc.avg_pool) != (3, 15) and BASELINE_POOLS == dict(min_pool=3, avg_pool=15)
    identity = SimpleNamespace(score=lambda vol: np.asarray(vol, dtype=np.float32))
    img = toy_scans(1)[0]
    got = _methods(restorer, {"raw": identity})["raw"](SimpleNamespace(image=img, affine=AFFINE))
    want = anomaly_map(identity, img, AFFINE, model.preprocess, cfg.replace(restorer.rc, **BASELINE_POOLS))
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, anomaly_map(identity, img, AFFINE, model.preprocess, restorer.rc))
