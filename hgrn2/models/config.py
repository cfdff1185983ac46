"""Model configs from named presets: the one way every family (LM, LRA, vision) builds a config and names a bad one."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TypeVar

Config = TypeVar("Config")


def check_sizes(config, *names: str) -> None:
    """Raise a ValueError naming the first field in ``names`` of ``config`` that is below 1."""
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")


def check_heads(config, width: str) -> None:
    """Raise a ValueError unless the model width, field ``width`` of ``config``, is a multiple of its
    ``expand_ratio`` (the head size)."""
    if getattr(config, width) % config.expand_ratio:
        raise ValueError(
            f"{width} ({getattr(config, width)}) must be a multiple of expand_ratio ({config.expand_ratio})"
        )


def check_fields(cls: type, names: Iterable[str], renamed: Mapping[str, str] | None = None) -> None:
    """Raise a ValueError naming each of ``names`` that is not a field of the dataclass ``cls``, and the field that
    replaced it where ``renamed`` (old name -> what to write instead) knows one."""
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(names) - known)
    if not unknown:
        return
    hints = "".join(f"; {name} is now {renamed[name]}" for name in unknown if renamed and name in renamed)
    raise ValueError(f"unknown {cls.__name__} field(s) {unknown}{hints}; valid fields are {sorted(known)}")


def from_preset(
    cls: type[Config],
    presets: Mapping[str, Mapping],
    name: str,
    overrides: Mapping,
    family: str,
    renamed: Mapping[str, str] | None = None,
) -> Config:
    """``cls`` built from the preset ``presets[name]`` with ``overrides`` applied; ``family`` names the presets in
    the error for an unknown name."""
    if name not in presets:
        raise ValueError(f"unknown {family} preset {name!r}; expected one of {sorted(presets)}")
    check_fields(cls, overrides, renamed)
    return cls(**{**presets[name], **overrides})
