"""The model card a run writes: what it was trained on and how (at the start), and what the best weights
measure on validation and on the external set (at the end, :func:`final_evaluation`)."""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from medai import runs
from medai.atomic import write_json
from medai.config import ExperimentConfig
from medai.data.datasets import Record, RecordSet, load_records
from medai.errors import DatasetError
from medai.evaluation.predict import predict_loader
from medai.evaluation.report import evaluate_logits, write_predictions_csv
from medai.models.checkpoint import load_checkpoint, save_checkpoint, update_card
from medai.models.pretrained import weight_source
from medai.precision import Precision


def weights_provenance(pretrained: str | None) -> dict[str, str] | None:
    """What the card says of the weights a run started from (packaged source with its licence, or a file)."""
    if not pretrained:
        return None
    named = weight_source(pretrained)
    return named.card() if named else {"source": "file", "file": Path(pretrained).name}


def data_summary(recset: RecordSet, train: list[Record], val: list[Record]) -> dict[str, Any]:
    summary = recset.summary()

    def counts(recs: list[Record]) -> dict[str, Any]:
        per = np.sum([r.target for r in recs], axis=0)
        return {"images": len(recs), "patients": len({r.patient_id for r in recs}),
                "per_label": {lab: int(c) for lab, c in zip(recset.labels, per)}}

    return {"root": summary["root"], "format": summary["format"],
            "used": {"train": counts(train), "val": counts(val)},
            "patient_disjoint": not ({r.patient_id for r in train} & {r.patient_id for r in val}),
            "extra_train": summary.get("extra_train")}


def card_base(cfg: ExperimentConfig, recset: RecordSet, train: list[Record], val: list[Record],
              model_kwargs: dict[str, Any], preprocessing: dict[str, Any], distributed: dict[str, Any]
              ) -> dict[str, Any]:
    """The card fields known before the first epoch (every saved best checkpoint carries them)."""
    return dict(architecture=cfg.model.name, model_kwargs=model_kwargs, task_kind=recset.kind,
                labels=recset.labels, preprocessing=preprocessing, task_name=cfg.name,
                body_part=cfg.data.body_part, starting_weights=weights_provenance(cfg.model.pretrained),
                training_config=cfg.to_dict(), data_summary=data_summary(recset, train, val),
                distributed=distributed)


def save_weights(model: torch.nn.Module, card: dict[str, Any], run_dir: Path, epoch: int, *, best: bool,
                 keep: bool) -> None:
    """After epoch ``epoch`` (from 0): the best weights so far, and with ``train.keep_epochs`` this epoch's
    (``runs.epoch_weights``, counted from 1), each with the card."""
    if keep:
        path = runs.epoch_weights(run_dir, epoch + 1)
        path.parent.mkdir(exist_ok=True)
        save_checkpoint(model, {**card, "epoch": epoch + 1}, path)
    if best:
        save_checkpoint(model, card, run_dir / runs.BEST_WEIGHTS)


def final_evaluation(cfg: ExperimentConfig, run_dir: Path, prec: Precision, labels: list[str], kind: str,
                     val_loader: DataLoader, loader_for: Callable[[list[Record]], DataLoader]) -> dict[str, Any]:
    """Best weights on val: temperature, thresholds, metrics with CIs; then the external set (at val's
    thresholds) when the config names one. Written to the run (eval.json, predictions*.csv) and the card."""
    t = cfg.train
    best = load_checkpoint(run_dir / runs.BEST_WEIGHTS, prec.device)
    preds = predict_loader(best.model, val_loader, prec)
    metrics, probs = evaluate_logits(preds["logits"], preds["targets"], labels, kind,
                                     threshold_method=t.threshold_method, target_sensitivity=t.target_sensitivity,
                                     n_boot=t.bootstrap, seed=t.seed)
    write_predictions_csv(run_dir / "predictions.csv", preds["ids"], preds["patients"], preds["targets"], probs,
                          labels)
    report: dict[str, Any] = {"val": metrics}
    if cfg.data.eval_root:
        report["external"] = _external(cfg, run_dir, prec, best.model, labels, kind, metrics, loader_for)
    write_json(run_dir / "eval.json", report)
    update_card(run_dir / runs.BEST_WEIGHTS, thresholds={lab: metrics["per_class"][lab]["threshold"] for lab in labels},
                temperature=metrics["calibration"]["temperature"], metrics=report,
                training={"hardware": f"{platform.processor() or platform.machine()} / {prec.device} / {prec.name}"})
    return {"val_auroc": metrics["macro"]["auroc"], "val_map": metrics["macro"]["ap"]}


def _external(cfg: ExperimentConfig, run_dir: Path, prec: Precision, model: torch.nn.Module, labels: list[str],
              kind: str, val_metrics: dict, loader_for: Callable[[list[Record]], DataLoader]) -> dict[str, Any]:
    root = cfg.data.eval_root
    recset = load_records(cfg.data, root)
    if recset.labels != labels:
        raise DatasetError(f"data.eval_root {root}: labels {recset.labels} differ from training labels")
    preds = predict_loader(model, loader_for(recset.records), prec)
    metrics, probs = evaluate_logits(preds["logits"], preds["targets"], labels, kind,
                                     temperature=val_metrics["calibration"]["temperature"],
                                     thresholds=[val_metrics["per_class"][lab]["threshold"] for lab in labels],
                                     n_boot=cfg.train.bootstrap)
    write_predictions_csv(run_dir / "predictions_external.csv", preds["ids"], preds["patients"], preds["targets"],
                          probs, labels)
    return {"root": root, **metrics}
