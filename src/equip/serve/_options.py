"""The key=value options of the serving commands (predict, the app), typed by a dataclass."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from equip.errors import EquipError


def typed_options(defaults: DictConfig, args: list[str], command: str) -> DictConfig:
    """key=value pairs onto `defaults` (a structured config): an unknown key or a wrong type is
    one line naming the key and the options."""
    try:
        return OmegaConf.merge(defaults, OmegaConf.from_dotlist(args))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        known = ", ".join(defaults)
        raise EquipError(
            f"{key}: {str(e).splitlines()[0]}; options: {known} (python -m {command} -h)"
        ) from None
