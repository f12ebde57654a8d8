"""``python -m medai doctor``: what this installation has and whether its parts are healthy."""

from __future__ import annotations

import platform
import shutil
import sqlite3
from dataclasses import dataclass

from medai.errors import MedaiError
from medai.paths import data_dir, medai_home


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _versions() -> list[Check]:
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    detail = f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}"
    if cuda:
        detail += (f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                   f"{torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
        free, total = torch.cuda.mem_get_info()
        device = Check("device", True, f"GPU memory {free / 2**30:.1f} / {total / 2**30:.1f} GiB free")
    else:
        device = Check("device", True, "no GPU: training and inference on CPU (fp32, or bf16 autocast)")
    return [Check("versions", True, detail), device]


def _memory() -> Check:
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        avail = int(info["MemAvailable"].split()[0]) / 2**20
        total = int(info["MemTotal"].split()[0]) / 2**20
        return Check("memory", avail > 2, f"{avail:.1f} / {total:.1f} GiB available")
    except (OSError, KeyError, ValueError):
        return Check("memory", True, "unknown on this system")


def _disk() -> list[Check]:
    out = []
    for name in ("results", "backups"):
        folder = medai_home() / name
        probe = folder if folder.exists() else medai_home()
        free = shutil.disk_usage(probe).free / 2**30
        out.append(Check(f"disk ({name})", free > 1, f"{free:.1f} GiB free at {probe}"))
    return out


def _store() -> Check:
    from medai.store import MIGRATIONS, Store

    try:
        store = Store()
        version = store.schema_version()
        conn = sqlite3.connect(store.path)
        result = conn.execute("PRAGMA integrity_check").fetchone()[0]
        conn.close()
    except (MedaiError, sqlite3.Error) as exc:
        return Check("store", False, str(exc))
    return Check("store", result == "ok" and version == len(MIGRATIONS),
                 f"{store.path}: integrity {result}, schema {version} of {len(MIGRATIONS)}")


def _checkpoints() -> list[Check]:
    from medai.catalog import list_models
    from medai.models.checkpoint import load_checkpoint

    entries, problems = list_models(include_runs=False)
    out = [Check("checkpoint", False, p) for p in problems]
    for entry in entries:
        try:
            load_checkpoint(entry.path)
            out.append(Check(f"{entry.source} {entry.name}", True, f"{entry.card['architecture']}, "
                             f"{len(entry.card['labels'])} labels, loads"))
        except MedaiError as exc:
            out.append(Check(f"{entry.source} {entry.name}", False, str(exc)))
    return out or [Check("checkpoints", False, "no model in models/")]


def _data() -> Check:
    root = data_dir()
    if not root.is_dir():
        return Check("data", False, f"{root} does not exist (set MEDAI_DATA_DIR)")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    return Check("data", bool(names), f"{root}: {', '.join(names) or 'no datasets'}")


def run_checks() -> list[Check]:
    return [*_versions(), _memory(), *_disk(), _store(), *_checkpoints(), _data()]
