"""Typed configuration: the choice fields are Literals checked when a config is built."""
from __future__ import annotations

import dataclasses
import json

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
    from ifad_fast.backends import OPERAND_DTYPES, RUNS, TorchBackend, parse_precision
    from ifad_fast.fast import FastBackend
    from ifad_fast.triton_backend import TritonBackend

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
