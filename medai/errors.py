"""Exception classes shared by the package.

Every error a user can cause derives from :class:`MedaiError`; its message says what went wrong and
what to do about it. The CLI prints such messages without a traceback.
"""


class MedaiError(Exception):
    """Base class for errors whose message is meant for the user."""


class ConfigError(MedaiError):
    """A configuration file or override is invalid (the message names the key)."""


class DatasetError(MedaiError):
    """A dataset folder or label file cannot be used."""


class CheckpointError(MedaiError):
    """A checkpoint file is missing, corrupt or not a MedAI checkpoint."""


class PretrainedWeightsError(MedaiError):
    """Pretrained weights were asked for but cannot be loaded."""


class StorageError(MedaiError):
    """A file could not be written (disk full, file too large, read-only folder, no permission)."""
