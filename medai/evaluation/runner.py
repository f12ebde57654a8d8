"""Evaluate a checkpoint on a labelled dataset split: the code path behind ``python -m medai evaluate``
and the model-card numbers of shipped models (so the two always agree)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from medai.config import DataConfig
from medai.data.datasets import XrayDataset, cap_records, load_records
from medai.data.transforms import PreprocessSpec
from medai.errors import MedaiError
from medai.evaluation.report import evaluate_logits, read_predictions_csv
from medai.models.checkpoint import LoadedCheckpoint
from medai.precision import resolve_device, resolve_precision
from medai.evaluation.predict import predict_loader


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    probs: np.ndarray
    preds: dict[str, Any]  # ids, patients, targets, logits


def evaluate_checkpoint(ckpt: LoadedCheckpoint, data_cfg: DataConfig, split: str = "val", *,
                        root: str | None = None, fit: bool = False, threshold_method: str = "youden",
                        target_sensitivity: float = 0.95, n_boot: int = 500, batch_size: int = 64,
                        seed: int = 0) -> Evaluation:
    """Metrics of ``ckpt`` on one split. ``fit=False`` applies the card's temperature and thresholds;
    ``fit=True`` fits them on this split (validation only)."""
    card = ckpt.card
    recset = load_records(data_cfg, root)
    if recset.labels != card["labels"]:
        raise MedaiError(f"dataset labels {recset.labels} differ from the checkpoint's {card['labels']}")
    records = recset.records if split == "all" else recset.split(split)
    records = cap_records(records, data_cfg.max_samples, data_cfg.split_seed)
    if not records:
        raise MedaiError(f"split '{split}' of {recset.root} has no images")
    loader = DataLoader(XrayDataset(records, PreprocessSpec.from_dict(card["preprocessing"])),
                        batch_size=batch_size)
    preds = predict_loader(ckpt.model, loader, resolve_precision("off", resolve_device("cpu")))
    given = {} if fit else {"temperature": card.get("temperature", 1.0),
                            "thresholds": [card["thresholds"][lab] for lab in card["labels"]]}
    metrics, probs = evaluate_logits(preds["logits"], preds["targets"], card["labels"], card["task"]["kind"],
                                     threshold_method=threshold_method, target_sensitivity=target_sensitivity,
                                     n_boot=n_boot, seed=seed, **given)
    metrics["checkpoint"] = {"path": str(ckpt.path), "sha256": ckpt.sha256}
    metrics["data"] = {"root": recset.root, "split": split}
    return Evaluation(metrics, probs, preds)


def stored_evaluation(run_dir) -> Evaluation:
    """A finished run's validation evaluation as the trainer stored it (eval.json + predictions.csv)."""
    import json
    from pathlib import Path

    run_dir = Path(run_dir)
    try:
        metrics = json.loads((run_dir / "eval.json").read_text())["val"]
        table = read_predictions_csv(run_dir / "predictions.csv")
    except (OSError, ValueError, KeyError, MedaiError) as exc:
        raise MedaiError(f"{run_dir.name} has no readable stored evaluation ({exc})") from None
    if table.targets is None:
        raise MedaiError(f"{run_dir.name}: its predictions.csv has no true_<label> columns")
    return Evaluation(metrics, table.probs, {"targets": table.targets, "labels": table.labels, "ids": table.ids})
