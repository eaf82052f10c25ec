"""The one exception type users see: a message that names the key or file and the fix."""


class EquipError(Exception):
    """Bad input (config, data, tracking). Raised before training wherever it can be detected."""
