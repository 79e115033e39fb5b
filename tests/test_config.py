"""Typed configuration: the choice fields are Literals checked when a config is built."""
from __future__ import annotations

import dataclasses

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


def test_named_schedules_and_presets_are_valid():
    for schedule in cfg.SCHEDULES.values():
        cfg.RestoreConfig(**schedule)
    for preset in cfg.PRESETS.values():
        cfg.TrainConfig(**dataclasses.asdict(preset.train))
