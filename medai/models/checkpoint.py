"""Checkpoints: one ``.safetensors`` file whose metadata holds the JSON model card.

Loading rebuilds the model from the card alone and never unpickles anything. Saving is atomic.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

import medai
from medai.atomic import atomic_path
from medai.errors import CheckpointError
from medai.models.registry import MedaiModel, create_model

CARD_KEY = "medai_card"
FORMAT = "medai-checkpoint/1"
REQUIRED_CARD_KEYS = ("architecture", "model_kwargs", "task", "labels", "preprocessing")


@dataclass
class LoadedCheckpoint:
    model: MedaiModel
    card: dict[str, Any]
    path: Path
    sha256: str


def new_card(architecture: str, model_kwargs: dict, task_kind: str, labels: list[str],
             preprocessing: dict, **extra: Any) -> dict[str, Any]:
    card = {
        "format": FORMAT, "architecture": architecture, "model_kwargs": model_kwargs,
        "task": {"kind": task_kind, "name": extra.pop("task_name", ""),
                 "body_part": extra.pop("body_part", None)},
        "labels": list(labels),
        "preprocessing": preprocessing,
        "thresholds": {lab: 0.5 for lab in labels}, "temperature": 1.0,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": medai.__version__,
    }
    card.update(extra)
    return card


def save_checkpoint(model: MedaiModel, card: dict[str, Any], path: str | os.PathLike,
                    dtype: torch.dtype | None = None) -> Path:
    """Write weights + card atomically. ``dtype=torch.float16`` stores floats compactly."""
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise CheckpointError(f"model card lacks {missing}")
    tensors = {}
    for key, value in model.state_dict().items():
        t = value.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[key] = t.contiguous().clone()
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={CARD_KEY: json.dumps(card, default=str)})
    return path


def write_tensors(path: str | os.PathLike, tensors: dict[str, Any], card: dict[str, Any]) -> Path:
    """Tensors (torch or numpy) and a JSON card in one ``.safetensors`` file, written atomically, with a
    ``.json`` copy of the card beside it for people. NumPy arrays are stored in C order: safetensors writes
    an array's buffer as it lies, so a Fortran-ordered one (PCA components, regression coefficients)
    would load transposed."""
    import numpy as np

    from medai.atomic import write_json

    path = Path(path)
    meta = {CARD_KEY: json.dumps(card, default=str)}
    with atomic_path(path) as tmp:
        if all(isinstance(v, np.ndarray) for v in tensors.values()):
            from safetensors.numpy import save_file as save_np

            save_np({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=meta)
        else:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    write_json(path.with_suffix(".json"), card)
    return path


def read_tensors(path: str | os.PathLike, framework: str = "pt", what: str = "checkpoint"
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tensors and the card of a file ``write_tensors`` wrote; one clear error for any unreadable file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework=framework) as fh:
            card = json.loads((fh.metadata() or {}).get(CARD_KEY, "{}"))
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name} is not a readable {what} ({exc})") from None
    return tensors, card


@functools.lru_cache(maxsize=8)
def _loaded(loader: Callable[[Path], Any], key: tuple[str, int, int]) -> Any:
    return loader(Path(key[0]))


def load_cached(loader: Callable[[Path], Any], path: Path) -> Any:
    """``loader(path)``, kept while the file is unchanged (a replaced file is loaded again)."""
    from medai.imaging import file_key

    return _loaded(loader, file_key(path))


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name} is not a readable .safetensors checkpoint ({exc})") from None
    if CARD_KEY not in meta:
        raise CheckpointError(f"{path.name} has no MedAI model card; it is not a MedAI checkpoint")
    try:
        card = json.loads(meta[CARD_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path.name}: the model card is not valid JSON ({exc})") from None
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise CheckpointError(f"{path.name}: the model card lacks {missing}")
    return card


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the model from the card and load its weights (as float32), in eval mode."""
    path = Path(path)
    card = read_card(path)
    model = create_model(card["architecture"], num_classes=len(card["labels"]), **card["model_kwargs"])
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path.name}: weights cannot be read ({exc})") from None
    own = model.state_dict()
    tensors = {k: v.to(own[k].dtype) if k in own else v for k, v in tensors.items()}
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path.name}: weights do not match the card's architecture ({exc})") from None
    model.eval().to(device)
    return LoadedCheckpoint(model, card, path, file_sha256(path))


def update_card(path: str | os.PathLike, **changes: Any) -> dict[str, Any]:
    """Rewrite a checkpoint's card (thresholds, temperature, metrics ...) keeping its weights."""
    path = Path(path)
    card = read_card(path)
    card.update(changes)
    tensors = load_file(str(path))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={CARD_KEY: json.dumps(card, default=str)})
    return card
