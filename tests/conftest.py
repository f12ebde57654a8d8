"""Shared fixtures: real data from ../shared/data (skipped with a reason when absent) and a temporary
MEDAI_HOME so that no test touches a real installation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("MEDAI_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()

# The browser suite needs Playwright, which only `make e2e` installs (requirements-e2e.txt); `make test`
# deselects those tests anyway, so without Playwright the folder is not even imported.
try:
    import playwright  # noqa: F401
except ImportError:
    collect_ignore = ["e2e"]


def need(relative: str) -> Path:
    """Path of a real dataset under ../shared/data, or skip the test saying what is missing."""
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"real data {path} is absent (a clone without ../shared/data)")
    return path


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("decode-cache")


@pytest.fixture(autouse=True)
def medai_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_cache: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("MEDAI_HOME", str(home))
    monkeypatch.setenv("MEDAI_DATA_DIR", str(DATA))
    monkeypatch.setenv("MEDAI_CACHE_DIR", str(shared_cache))
    return home


def free_port() -> int:
    """A free TCP port on loopback (for servers the tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, check: bool = False, timeout: float = 600,
            env: dict[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """``python -m medai ...`` in a subprocess with the test's environment (plus ``env``)."""
    proc = subprocess.run([sys.executable, "-m", "medai", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, input=input, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"medai {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def tiny_config(tmp_path: Path, root: str, **sections: dict) -> Path:
    """Write a small, fast config for tests; ``sections`` override keys per section."""
    import yaml

    tree = {
        "name": "test",
        "data": {"root": root},
        "preprocess": {"image_size": 48},
        "augment": {"enabled": False},
        "model": {"name": "hybrid_cnn_transformer", "kwargs": {"d_model": 64, "num_heads": 4, "num_layers": 1}},
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "num_workers": 0, "bootstrap": 50, "log_every": 1,
                  "warmup_epochs": 0.0},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            tree.setdefault(section, {}).update(values)
        else:
            tree[section] = values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path
