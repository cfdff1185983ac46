"""Model configs from named presets: the one way every family (LM, LRA, vision) builds a config and names a bad one."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TypeVar

Config = TypeVar("Config")


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
