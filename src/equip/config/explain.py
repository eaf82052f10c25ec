"""Config keys: unknown or unset ones refused, and Hydra's and OmegaConf's errors about a key in
equip's one line: the key, the bad value, what is wrong and the fix. Their own text spans several
lines and names Python types (`could not be converted to Float`), not what to type instead."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from equip.errors import EquipError
from equip.track.redaction import redact_tree

WHICH_DATA = "Choose the data set with its group: data=synthetic (built in) or data=folder."


@contextmanager
def config_errors() -> Iterator[None]:
    """Around composing a config: an error about one key becomes an EquipError in one line;
    any other (a missing config file, a syntax error) goes on as it is."""
    from hydra.errors import HydraException

    try:
        yield
    except (HydraException, OmegaConfBaseException) as e:
        explained = config_error(e)
        if explained is None:
            raise
        raise explained from None


def config_error(e: BaseException) -> EquipError | None:
    """The one-line EquipError for an exception (or its cause) about one config key, or None."""
    cause = _key_error(e)
    if cause is None:
        return None
    key = str(cause.full_key)
    if isinstance(cause, ConfigKeyError | AttributeError) and cause.value is None:
        return EquipError(unknown_key(key, _known_keys(cause)))
    value = cause.value
    if value is None and "is not Optional" in str(cause.msg):
        return EquipError(f"{key}=null: a value is required here (null is not allowed).")
    expected = _expected_type(cause)
    if isinstance(expected, type) and issubclass(expected, Enum):
        return EquipError(choice_error(key, value, [m.name for m in expected]))
    what = {bool: "true or false", int: "a whole number", float: "a number"}.get(expected)
    if what is None and expected is not None and typing.get_origin(expected) is list:
        what = "a list, e.g. [8, 16]"
    if what is None:
        first = str(cause.msg).strip().splitlines()[0] if cause.msg else type(cause).__name__
        return EquipError(f"{key}={value!r}: {first}.")
    return EquipError(f"{key}={value!r} must be {what}.")


def choice_error(key: str, value: Any, allowed: list[str]) -> str:
    """'model.tta='vflip' is not one of: none, hflip.' plus the closest choice, if one is close."""
    close = difflib.get_close_matches(str(value), allowed, n=1)
    hint = f" Did you mean {key}={close[0]}?" if close else ""
    shown = "null" if value is None else repr(value)
    return f"{key}={shown} is not one of: {', '.join(allowed)}.{hint}"


def unknown_key(key: str, known: Iterable[str], value: Any = None) -> str:
    """One line for a key no config group has, with its close matches (a typo, usually)."""
    parent, _, name = key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    close = [prefix + k for k in difflib.get_close_matches(name, list(known), n=3)]
    where = f"in {parent}" if parent else "at the top level"
    fix = f"Did you mean {' or '.join(close)}?" if close else "See python train.py --cfg job."
    said = key if value is None else f"{key}={_show(key, value)}"
    return f"{said}: no such config key {where}. {fix} Keys of your own go under notes.*"


def _show(key: str, value: Any) -> str:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    value = redact_tree(value, key)  # +data.api_key=... is refused without being echoed
    return "null" if value is None else str(value).replace(" ", "")


# ---------------------------------------------------------------- after composing
def check_known_keys(cfg: DictConfig, prefix: str = "") -> None:
    """Refuse a key the schema lacks: `+model.fliters=[8]` is a typo, not a new setting (Hydra's
    `+` adds any key, and it would land in the run's name and identity)."""
    schema = OmegaConf.get_type(cfg)
    known = {f.name for f in fields(schema)} if is_dataclass(schema) else None
    for key in cfg:
        if not prefix and key == "hydra":  # Hydra's own node, present in callbacks' config
            continue
        if OmegaConf.is_missing(cfg, key):  # check_required names it
            continue
        if known is not None and key not in known:
            raise EquipError(unknown_key(f"{prefix}{key}", known, cfg[key]))
        if isinstance(cfg[key], DictConfig):
            check_known_keys(cfg[key], f"{prefix}{key}.")


def check_required(cfg: DictConfig) -> None:
    """A ??? value still unset (data.root of data=folder)."""
    missing: list[str] = []
    for key in cfg:
        if key == "hydra":  # Hydra's own node: its unset keys are Hydra's business
            continue
        if OmegaConf.is_missing(cfg, key):
            missing.append(str(key))
        elif isinstance(cfg[key], DictConfig):
            missing += sorted(OmegaConf.missing_keys(cfg[key]))
    if "data.root" in missing:
        raise EquipError(
            "data=folder needs data.root=PATH: a folder with one sub-folder of images per class."
        )
    if "data.kind" in missing:
        raise EquipError(
            f"data.kind is unset: data=common is what the data sets share, not one. {WHICH_DATA}"
        )
    if missing:
        raise EquipError(
            f"{missing[0]} is required: set it on the command line ({missing[0]}=...)."
        )


# ---------------------------------------------------------------- OmegaConf's exception
def _key_error(e: BaseException | None) -> OmegaConfBaseException | None:
    seen = 0
    while e is not None and seen < 10:  # Hydra wraps OmegaConf's error (raise ... from)
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _field_types(object_type: Any) -> dict[str, Any]:
    if not (isinstance(object_type, type) and is_dataclass(object_type)):
        return {}
    return typing.get_type_hints(object_type)


def _expected_type(cause: OmegaConfBaseException) -> Any:
    """The schema's type of the key (of the element, for a list element), without Optional."""
    if isinstance(cause.key, int):  # an element of a typed list: List[Feature] -> Feature
        args = typing.get_args(getattr(cause, "ref_type", None))
        expected = args[0] if args else None
    else:
        expected = _field_types(getattr(cause, "object_type", None)).get(str(cause.key))
    if typing.get_origin(expected) in (typing.Union, types.UnionType):  # X | None -> X
        args = [a for a in typing.get_args(expected) if a is not type(None)]
        expected = args[0] if len(args) == 1 else None
    return expected


def _known_keys(cause: OmegaConfBaseException) -> list[str]:
    object_type = getattr(cause, "object_type", None)
    if isinstance(object_type, type) and is_dataclass(object_type):
        return [f.name for f in fields(object_type)]
    parent = getattr(cause, "parent_node", None)
    return [str(k) for k in parent] if parent is not None else []
