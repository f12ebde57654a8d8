"""Run orchestration: a run folder, data, model, epochs with early stopping and two-stage fine-tuning,
resume after a crash, and the final evaluation that fills the checkpoint's model card.

``results/runs/<run_id>/``: config.yaml, progress.jsonl, status.json, best.safetensors, last.pt
(resume state, loaded with the weights-only unpickler), eval.json, predictions.csv, train.log.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import platform
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from medai.atomic import atomic_path, write_json, write_text
from medai.config import ExperimentConfig, dump_config, load_config
from medai.data.cache import DecodeCache
from medai.data.datasets import Record, RecordSet, XrayDataset, cap_records, load_records
from medai.data.transforms import PreprocessSpec, build_augmentation
from medai.errors import DatasetError, MedaiError
from medai.evaluation.metrics import quick_scores
from medai.evaluation.calibration import probs_from_logits
from medai.evaluation.report import evaluate_logits, write_predictions_csv
from medai.models import create_model
from medai.models.checkpoint import new_card, save_checkpoint, update_card
from medai.paths import cache_dir, runs_dir
from medai.training.amp import resolve_device, resolve_precision
from medai.training.callbacks import Callback, ProgressFile, StatusFile, truncate_progress
from medai.training.loop import EarlyStopping, StepClock, lr_factor, make_loss, predict_loader, train_one_epoch

log = logging.getLogger(__name__)
CANCEL_FILE = "cancel.request"


def new_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = runs_dir() / f"{cfg.name}-{stamp}-{secrets.token_hex(2)}"
    path.mkdir(parents=True)
    write_text(path / "config.yaml", dump_config(cfg))
    return path


class Trainer:
    def __init__(self, cfg: ExperimentConfig, run_dir: Path, callbacks: list[Callback] | None = None):
        self.cfg, self.run_dir = cfg, run_dir
        self.status = StatusFile(run_dir / "status.json")
        self.callbacks = [ProgressFile(run_dir / "progress.jsonl"), self.status, *(callbacks or [])]
        self._stop_reason: str | None = None

    # ------------------------------------------------------------------------------------------ set-up
    def _data(self) -> tuple[RecordSet, list[Record], list[Record]]:
        d = self.cfg.data
        recset = load_records(d)
        train = cap_records(recset.split(d.train_split), d.max_samples, d.split_seed)
        val = cap_records(recset.split(d.val_split), d.max_samples, d.split_seed)
        if not train or not val:
            raise DatasetError(f"{recset.root}: split '{d.train_split}' has {len(train)} and split "
                               f"'{d.val_split}' has {len(val)} images; both need images")
        return recset, train, val

    def _loader(self, records: list[Record], train: bool, epoch: int = 0) -> DataLoader:
        t = self.cfg.train
        ds = XrayDataset(records, self.spec, DecodeCache(cache_dir()) if t.cache else None,
                         build_augmentation(self.cfg.augment) if train else None)
        gen = torch.Generator().manual_seed(t.seed * 1000 + epoch)
        return DataLoader(ds, batch_size=t.batch_size if train else t.batch_size * 2, shuffle=train,
                          generator=gen, num_workers=t.num_workers, drop_last=False,
                          pin_memory=self.prec.device.type == "cuda",
                          persistent_workers=False)

    def _request_stop(self, signum: int, _frame: Any) -> None:
        self._stop_reason = f"signal {signal.Signals(signum).name}"

    def _should_stop(self) -> bool:
        if self._stop_reason is None and (self.run_dir / CANCEL_FILE).exists():
            self._stop_reason = "cancel requested"
        return self._stop_reason is not None

    # ------------------------------------------------------------------------------------------ run
    def fit(self) -> Path:
        handler = logging.FileHandler(self.run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_log = logging.getLogger("medai")
        package_log.addHandler(handler)
        if package_log.getEffectiveLevel() > logging.INFO:
            package_log.setLevel(logging.INFO)
        try:
            return self._fit()
        finally:
            package_log.removeHandler(handler)
            handler.close()

    def _fit(self) -> Path:
        cfg, t = self.cfg, self.cfg.train
        torch.manual_seed(t.seed)
        torch.use_deterministic_algorithms(t.deterministic, warn_only=True)
        self.prec = resolve_precision(t.amp, resolve_device(t.device))
        self.spec = PreprocessSpec(cfg.preprocess.image_size, cfg.preprocess.mean, cfg.preprocess.std)
        recset, train, val = self._data()
        self.labels, self.kind = recset.labels, recset.kind
        model_kwargs = dict(cfg.model.kwargs)
        if cfg.model.name.startswith(("vit_", "hybrid")):
            model_kwargs.setdefault("image_size", self.spec.image_size)
        model = create_model(cfg.model.name, len(self.labels), pretrained=cfg.model.pretrained, **model_kwargs)
        model.to(self.prec.device)
        if t.channels_last:
            model.to(memory_format=torch.channels_last)
        train_targets = np.stack([r.target for r in train])
        loss_fn = make_loss(self.kind, train_targets, t, self.prec.device)
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)
        steps_per_epoch = math.ceil(len(train) / t.batch_size)
        if t.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
        total_steps = steps_per_epoch * t.epochs
        warmup = int(t.warmup_epochs * steps_per_epoch)
        state = self._resume_state(model, optimizer)
        clock = StepClock(step=state["step"], total_steps=total_steps)
        stopper = EarlyStopping(t.early_stopping_patience, t.early_stopping_min_delta, **state["stopper"])
        self.card_base = dict(architecture=cfg.model.name, model_kwargs=model_kwargs, task_kind=self.kind,
                              labels=self.labels, preprocessing=self.spec.to_dict(), task_name=cfg.name,
                              body_part=cfg.data.body_part,
                              training_config=cfg.to_dict(), data_summary=self._data_summary(recset, train, val))

        def lr_at(step: int) -> float:
            stage = t.finetune_lr_factor if (t.head_epochs and step >= t.head_epochs * steps_per_epoch) else 1.0
            return t.lr * stage * lr_factor(step, total_steps, warmup, t.min_lr_ratio)

        signal.signal(signal.SIGTERM, self._request_stop)
        info = {"run_id": self.run_dir.name, "total_steps": total_steps, "start_step": state["step"],
                "epochs": t.epochs, "precision": self.prec.name, "device": str(self.prec.device)}
        for cb in self.callbacks:
            cb.on_train_start(info)
        log.info("run %s: %s on %s (%s), %d train / %d val images, %d labels", self.run_dir.name,
                 cfg.model.name, self.prec.device, self.prec.name, len(train), len(val), len(self.labels))
        val_loader = self._loader(val, False)
        end_state = "finished"
        try:
            for epoch in range(state["epoch"], t.epochs):
                self._set_stage(model, epoch)
                torch.manual_seed(t.seed * 1000 + epoch)
                started = time.perf_counter()
                result = train_one_epoch(model, self._loader(train, True, epoch), optimizer, loss_fn,
                                         self.prec, t, clock, epoch, lr_at, self._emit_step, self._should_stop)
                if result.get("stopped"):
                    end_state = "cancelled"
                    break
                preds = predict_loader(model, val_loader, self.prec, t.channels_last, loss_fn)
                scores = quick_scores(preds["targets"], probs_from_logits(preds["logits"], self.kind))
                improved = stopper.update(scores["auroc"], epoch)
                if improved:
                    save_checkpoint(model, new_card(**self.card_base), self.run_dir / "best.safetensors")
                record = {"type": "epoch", "epoch": epoch, "step": clock.step, "train_loss": result["loss"],
                          "val_loss": preds["loss"], "val_auroc": scores["auroc"], "val_map": scores["map"],
                          "lr": lr_at(max(clock.step - 1, 0)), "images_per_s": clock.images_per_s(),
                          "epoch_time_s": time.perf_counter() - started, "eta_s": clock.eta_s(),
                          "best_val_auroc": stopper.best, "improved": improved, "time": time.time()}
                state.update(epoch=epoch + 1, step=clock.step, stopper=stopper.state())
                self._save_state(model, optimizer, state)
                for cb in self.callbacks:
                    cb.on_epoch(record)
                if stopper.should_stop:
                    log.info("early stopping after epoch %d (best %.4f at epoch %d)", epoch,
                             stopper.best, stopper.best_epoch)
                    break
                if self._should_stop():
                    end_state = "cancelled"
                    break
            summary: dict[str, Any] = {"best_epoch": stopper.best_epoch, "best_val_auroc": stopper.best,
                                       "epochs_done": state["epoch"]}
            if end_state == "finished":
                summary.update(self._final_evaluation(val_loader))
        except BaseException as exc:
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
            log.exception("run %s failed", self.run_dir.name)
            for cb in self.callbacks:
                cb.on_train_end("cancelled" if isinstance(exc, KeyboardInterrupt) else "failed",
                                {"error": reason})
            raise
        for cb in self.callbacks:
            cb.on_train_end(end_state, {"message": self._stop_reason or "", **summary})
        return self.run_dir

    def _emit_step(self, record: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_step(record)

    def _set_stage(self, model: torch.nn.Module, epoch: int) -> None:
        head_only = epoch < self.cfg.train.head_epochs
        head = {id(p) for p in model.head_parameters()}
        for p in model.parameters():
            p.requires_grad_(not head_only or id(p) in head)

    # ------------------------------------------------------------------------------------------ resume
    def _resume_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": 0, "step": 0, "stopper": {}}
        path = self.run_dir / "last.pt"
        if not path.is_file():
            return state
        saved = torch.load(path, map_location=self.prec.device, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state.update(saved["loop"])
        truncate_progress(self.run_dir / "progress.jsonl", state["epoch"])
        log.info("resumed %s after epoch %d (step %d)", self.run_dir.name, state["epoch"] - 1, state["step"])
        return state

    def _save_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        with atomic_path(self.run_dir / "last.pt") as tmp:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "loop": dict(state)},
                       tmp)

    # ------------------------------------------------------------------------------------------ evaluation
    def _data_summary(self, recset: RecordSet, train: list[Record], val: list[Record]) -> dict[str, Any]:
        summary = recset.summary()

        def counts(recs: list[Record]) -> dict[str, Any]:
            per = np.sum([r.target for r in recs], axis=0)
            return {"images": len(recs), "patients": len({r.patient_id for r in recs}),
                    "per_label": {lab: int(c) for lab, c in zip(recset.labels, per)}}

        return {"root": summary["root"], "format": summary["format"], "used": {"train": counts(train),
                "val": counts(val)}, "patient_disjoint": not ({r.patient_id for r in train}
                                                              & {r.patient_id for r in val})}

    def _final_evaluation(self, val_loader: DataLoader) -> dict[str, Any]:
        """Best weights on val: temperature, thresholds, metrics with CIs; written to the run and card."""
        from medai.models.checkpoint import load_checkpoint

        t = self.cfg.train
        best = load_checkpoint(self.run_dir / "best.safetensors", self.prec.device)
        preds = predict_loader(best.model, val_loader, self.prec)
        metrics, probs = evaluate_logits(preds["logits"], preds["targets"], self.labels, self.kind,
                                         threshold_method=t.threshold_method,
                                         target_sensitivity=t.target_sensitivity, n_boot=t.bootstrap,
                                         seed=t.seed)
        write_predictions_csv(self.run_dir / "predictions.csv", preds["ids"], preds["patients"],
                              preds["targets"], probs, self.labels)
        report: dict[str, Any] = {"val": metrics}
        extra_root = self.cfg.data.eval_root
        if extra_root:
            report["external"] = self._evaluate_external(best.model, extra_root, metrics)
        write_json(self.run_dir / "eval.json", report)
        thresholds = {lab: metrics["per_class"][lab]["threshold"] for lab in self.labels}
        update_card(self.run_dir / "best.safetensors", thresholds=thresholds,
                    temperature=metrics["calibration"]["temperature"],
                    metrics=report,
                    training={"hardware": f"{platform.processor() or platform.machine()} / "
                              f"{self.prec.device} / {self.prec.name}"})
        return {"val_auroc": metrics["macro"]["auroc"], "val_map": metrics["macro"]["ap"]}

    def _evaluate_external(self, model: torch.nn.Module, root: str, val_metrics: dict) -> dict[str, Any]:
        recset = load_records(self.cfg.data, root)
        if recset.labels != self.labels:
            raise DatasetError(f"data.eval_root {root}: labels {recset.labels} differ from training labels")
        preds = predict_loader(model, self._loader(recset.records, False), self.prec)
        thresholds = [val_metrics["per_class"][lab]["threshold"] for lab in self.labels]
        metrics, probs = evaluate_logits(preds["logits"], preds["targets"], self.labels, self.kind,
                                         temperature=val_metrics["calibration"]["temperature"],
                                         thresholds=thresholds, n_boot=self.cfg.train.bootstrap)
        write_predictions_csv(self.run_dir / "predictions_external.csv", preds["ids"], preds["patients"],
                              preds["targets"], probs, self.labels)
        return {"root": root, **metrics}


def train(cfg: ExperimentConfig, callbacks: list[Callback] | None = None) -> Path:
    """Start a new run; returns its folder."""
    return Trainer(cfg, new_run_dir(cfg), callbacks).fit()


def resume(run: str | os.PathLike, callbacks: list[Callback] | None = None) -> Path:
    """Continue a run from its last completed epoch (after a cancel, crash or kill -9)."""
    run_dir = Path(run)
    if not run_dir.is_dir():
        run_dir = runs_dir() / str(run)
    if not (run_dir / "config.yaml").is_file():
        raise MedaiError(f"no run folder with a config.yaml at {run} (looked in {runs_dir()})")
    (run_dir / CANCEL_FILE).unlink(missing_ok=True)
    return Trainer(load_config(run_dir / "config.yaml"), run_dir, callbacks).fit()
