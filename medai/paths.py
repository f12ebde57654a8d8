"""Where state lives: ``MEDAI_HOME`` (models, configs, data, results, backups) and ``MEDAI_DATA_DIR``."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODELS_DIR = PROJECT_ROOT / "models"


def env_number(name: str, default: float) -> float:
    """A numeric setting from the environment (unset or empty: ``default``)."""
    from medai.errors import ConfigError

    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


def medai_home() -> Path:
    """The installation's state folder (default: the project root)."""
    return Path(os.environ.get("MEDAI_HOME", PROJECT_ROOT)).expanduser().resolve()


def data_dir() -> Path:
    """Root folder that relative dataset paths are resolved against (default ``../shared/data``)."""
    default = PROJECT_ROOT.parent / "shared" / "data"
    return Path(os.environ.get("MEDAI_DATA_DIR", default)).expanduser().resolve()


def results_dir() -> Path:
    return medai_home() / "results"


def runs_dir() -> Path:
    return results_dir() / "runs"


def cache_dir() -> Path:
    """Decoded-image cache (uint8 arrays keyed by file content and target size)."""
    return Path(os.environ.get("MEDAI_CACHE_DIR", medai_home() / "data" / "cache")).expanduser()


def resolve_data_path(path: str | os.PathLike) -> Path:
    """Absolute paths stay as they are; relative ones are taken under :func:`data_dir`."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else data_dir() / p
