"""Run orchestration: a run folder, data, model, epochs with early stopping and two-stage fine-tuning,
resume after a crash, and the final evaluation that fills the checkpoint's model card.

``results/runs/<run_id>/``: config.yaml, progress.jsonl, status.json, best.safetensors, last.pt
(resume state, loaded with the weights-only unpickler), eval.json, predictions.csv, train.log.

Under ``torchrun`` the same code trains data-parallel (see :mod:`medai.training.distributed`): rank 0
owns the run folder, every rank trains on its shard.
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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from medai.atomic import atomic_path, write_json, write_text
from medai.config import ExperimentConfig, dump_config, load_config
from medai.data.cache import DecodeCache
from medai.data.datasets import Record, RecordSet, XrayDataset, cap_records, load_records
from medai.data.transforms import PreprocessSpec, build_augmentation
from medai.errors import DatasetError, MedaiError, StorageError
from medai.evaluation.metrics import quick_scores
from medai.evaluation.calibration import probs_from_logits
from medai.evaluation.report import evaluate_logits, write_predictions_csv
from medai.models import create_model
from medai.models.checkpoint import new_card, save_checkpoint, update_card
from medai.models.pretrained import weight_source
from medai.paths import cache_dir, runs_dir
from medai.training import distributed
from medai.training.amp import resolve_device, resolve_precision
from medai.training.callbacks import Callback, ProgressFile, StatusFile, truncate_progress
from medai.training.distributed import SINGLE, DistContext
from medai.training.loop import EarlyStopping, StepClock, lr_factor, make_loss, predict_loader, train_one_epoch

log = logging.getLogger(__name__)
CANCEL_FILE = "cancel.request"


def new_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = runs_dir() / f"{cfg.name}-{stamp}-{secrets.token_hex(2)}"
    try:
        path.mkdir(parents=True)
        write_text(path / "config.yaml", dump_config(cfg))
    except OSError as exc:
        raise StorageError(f"cannot create the run folder {path}: {exc.strerror or exc}; the results folder "
                           f"{runs_dir()} must be writable by this user (is the disk full or read-only?)") from None
    return path


class Trainer:
    def __init__(self, cfg: ExperimentConfig, run_dir: Path, callbacks: list[Callback] | None = None,
                 ctx: DistContext = SINGLE):
        self.cfg, self.run_dir, self.ctx = cfg, run_dir, ctx
        self.callbacks: list[Callback] = []
        if ctx.is_main:  # only rank 0 writes progress, status and the log
            self.callbacks = [ProgressFile(run_dir / "progress.jsonl"), StatusFile(run_dir / "status.json"),
                              *(callbacks or [])]
        self._stop_reason: str | None = None
        self._stage: bool | None = None

    # ------------------------------------------------------------------------------------------ set-up
    def _data(self) -> tuple[RecordSet, list[Record], list[Record]]:
        d = self.cfg.data
        recset = load_records(d)
        train = cap_records(recset.split(d.train_split), d.max_samples, d.split_seed)
        val = cap_records(recset.split(d.val_split), d.max_samples, d.split_seed)
        need = self.ctx.world_size
        if len(train) < need or len(val) < need:
            raise DatasetError(f"{recset.root}: split '{d.train_split}' has {len(train)} and split "
                               f"'{d.val_split}' has {len(val)} images; each needs at least {need} "
                               f"(one per process)")
        return recset, train, val

    def _loader(self, records: list[Record], train: bool, epoch: int = 0) -> DataLoader:
        t = self.cfg.train
        ds = XrayDataset(records, self.spec, DecodeCache(cache_dir()) if t.cache else None,
                         build_augmentation(self.cfg.augment) if train else None)
        gen = torch.Generator().manual_seed(t.seed * 1000 + epoch)
        sampler = None
        if train and self.ctx.enabled:
            # disjoint shards, reshuffled per epoch; drop_last keeps every rank at the same step count
            # without padding a shard with another rank's images
            sampler = DistributedSampler(ds, self.ctx.world_size, self.ctx.rank, shuffle=True, seed=t.seed,
                                         drop_last=True)
            sampler.set_epoch(epoch)
        return DataLoader(ds, batch_size=t.batch_size if train else t.batch_size * 2,
                          shuffle=train and sampler is None, sampler=sampler, generator=gen,
                          num_workers=t.num_workers, drop_last=False,
                          pin_memory=self.prec.device.type == "cuda",
                          persistent_workers=False)

    def _request_stop(self, signum: int, _frame: Any) -> None:
        self._stop_reason = f"signal {signal.Signals(signum).name}"

    def _should_stop(self) -> bool:
        """Cancel file or signal; under torchrun a request seen by any rank stops every rank."""
        if self._stop_reason is None and self.ctx.is_main and (self.run_dir / CANCEL_FILE).exists():
            self._stop_reason = "cancel requested"
        if distributed.any_rank(self._stop_reason is not None, self.ctx, self.prec.device):
            self._stop_reason = self._stop_reason or "stop requested by another process"
            return True
        return False

    # ------------------------------------------------------------------------------------------ run
    def fit(self) -> Path:
        if not self.ctx.is_main:
            return self._fit()
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
        cfg, t, ctx = self.cfg, self.cfg.train, self.ctx
        torch.manual_seed(t.seed)
        torch.use_deterministic_algorithms(t.deterministic, warn_only=True)
        self.prec = resolve_precision(t.amp, distributed.device_for(resolve_device(t.device), ctx))
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
        sync_bn = t.sync_batchnorm and ctx.enabled and self.prec.device.type == "cuda"
        if t.sync_batchnorm and ctx.enabled and not sync_bn:
            log.warning("train.sync_batchnorm needs CUDA; CPU processes keep per-process BatchNorm statistics")
        if sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_targets = np.stack([r.target for r in train])
        loss_fn = make_loss(self.kind, train_targets, t, self.prec.device)
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)
        per_process = len(train) // ctx.world_size if ctx.enabled else len(train)
        steps_per_epoch = math.ceil(per_process / t.batch_size)
        if t.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
        total_steps = steps_per_epoch * t.epochs
        warmup = int(t.warmup_epochs * steps_per_epoch)
        state = self._resume_state(model, optimizer)
        clock = StepClock(step=state["step"], total_steps=total_steps, world_size=ctx.world_size)
        base_lr = t.lr * distributed.lr_scale(t.lr_scaling, ctx.world_size)
        stopper = EarlyStopping(t.early_stopping_patience, t.early_stopping_min_delta, **state["stopper"])
        self.card_base = dict(architecture=cfg.model.name, model_kwargs=model_kwargs, task_kind=self.kind,
                              labels=self.labels, preprocessing=self.spec.to_dict(), task_name=cfg.name,
                              body_part=cfg.data.body_part, starting_weights=starting_weights(cfg.model.pretrained),
                              training_config=cfg.to_dict(), data_summary=self._data_summary(recset, train, val),
                              distributed={"world_size": ctx.world_size, "backend": ctx.backend,
                                           "per_process_batch": t.batch_size,
                                           "effective_batch": t.batch_size * ctx.world_size,
                                           "lr_scaling": t.lr_scaling, "base_lr": t.lr, "effective_lr": base_lr,
                                           "sync_batchnorm": sync_bn})

        def lr_at(step: int) -> float:
            stage = t.finetune_lr_factor if (t.head_epochs and step >= t.head_epochs * steps_per_epoch) else 1.0
            return base_lr * stage * lr_factor(step, total_steps, warmup, t.min_lr_ratio)

        signal.signal(signal.SIGTERM, self._request_stop)
        info = {"run_id": self.run_dir.name, "total_steps": total_steps, "start_step": state["step"],
                "epochs": t.epochs, "precision": self.prec.name, "device": str(self.prec.device),
                "world_size": ctx.world_size}
        for cb in self.callbacks:
            cb.on_train_start(info)
        log.info("run %s: %s on %s (%s), %d train / %d val images, %d labels, %d process(es)",
                 self.run_dir.name, cfg.model.name, self.prec.device, self.prec.name, len(train), len(val),
                 len(self.labels), ctx.world_size)
        # each process predicts every world_size-th validation image; the predictions are gathered
        val_loader = self._loader(val[ctx.rank::ctx.world_size], False)
        end_state = "finished"
        try:
            for epoch in range(state["epoch"], t.epochs):
                net = self._set_stage(model, epoch)
                # per rank: each process draws its own augmentation and dropout (rank 0 = one process)
                torch.manual_seed(t.seed * 1000 + epoch + 7919 * ctx.rank)
                started = time.perf_counter()
                seen: list[str] | None = [] if ctx.enabled else None
                result = train_one_epoch(net, self._loader(train, True, epoch), optimizer, loss_fn,
                                         self.prec, t, clock, epoch, lr_at, self._emit_step, self._should_stop,
                                         seen)
                if result.get("stopped"):
                    end_state = "cancelled"
                    break
                distributed.sync_buffers(model, ctx)
                preds = self._predict_val(model, val_loader, loss_fn)
                decision = None
                if ctx.is_main:  # decided once, on all gathered scores, then broadcast
                    scores = quick_scores(preds["targets"], probs_from_logits(preds["logits"], self.kind))
                    improved = stopper.update(scores["auroc"], epoch)
                    decision = {"scores": scores, "improved": improved, "stopper": stopper.state()}
                decision = distributed.broadcast(decision, ctx)
                scores, improved = decision["scores"], decision["improved"]
                stopper = EarlyStopping(t.early_stopping_patience, t.early_stopping_min_delta,
                                        **decision["stopper"])
                if improved and ctx.is_main:
                    save_checkpoint(model, new_card(**self.card_base), self.run_dir / "best.safetensors")
                record = {"type": "epoch", "epoch": epoch, "step": clock.step, "train_loss": result["loss"],
                          "val_loss": preds["loss"], "val_auroc": scores["auroc"], "val_map": scores["map"],
                          "lr": lr_at(max(clock.step - 1, 0)), "images_per_s": clock.images_per_s(),
                          "epoch_time_s": time.perf_counter() - started, "eta_s": clock.eta_s(),
                          "best_val_auroc": stopper.best, "improved": improved, "time": time.time()}
                if ctx.enabled:
                    record.update(self._rank_report(model, seen or [], result["loss"]))
                state.update(epoch=epoch + 1, step=clock.step, stopper=stopper.state())
                if ctx.is_main:
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
            if end_state == "finished" and ctx.is_main:
                summary.update(self._final_evaluation(self._loader(val, False) if ctx.enabled else val_loader))
        except BaseException as exc:
            storage = _storage_failure(exc, self.run_dir)
            reason = ("interrupted" if isinstance(exc, KeyboardInterrupt) else str(storage) if storage
                      else f"{type(exc).__name__}: {exc}")
            if storage:  # the cause is outside the program: no traceback, say what to do
                log.error("run %s failed: %s", self.run_dir.name, storage)
            else:
                log.exception("run %s failed", self.run_dir.name)
            for cb in self.callbacks:
                try:
                    cb.on_train_end("cancelled" if isinstance(exc, KeyboardInterrupt) else "failed",
                                    {"error": reason})
                except OSError as write_error:  # the same full disk may refuse the status file too
                    log.error("could not record the failure in %s: %s", self.run_dir.name, write_error)
            if storage:
                raise storage from None
            raise
        for cb in self.callbacks:
            cb.on_train_end(end_state, {"message": self._stop_reason or "", **summary})
        return self.run_dir

    def _emit_step(self, record: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_step(record)

    def _set_stage(self, model: torch.nn.Module, epoch: int) -> torch.nn.Module:
        """Freeze all but the head in stage one; returns the module to train (the DDP wrapper, rebuilt
        when the set of trainable parameters changes, since DDP registers them when it is built)."""
        head_only = epoch < self.cfg.train.head_epochs
        trained = {id(p) for p in (model.head_parameters() if head_only else model.trainable_parameters())}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
        if not self.ctx.enabled:
            return model
        if self._stage != head_only:
            self._stage = head_only
            cuda = self.prec.device.type == "cuda"
            self._ddp = DistributedDataParallel(model, device_ids=[self.prec.device.index] if cuda else None)
        return self._ddp

    def _predict_val(self, model: torch.nn.Module, loader: DataLoader, loss_fn: torch.nn.Module) -> dict:
        """Validation predictions over the whole val set, in dataset order, on every rank."""
        preds = predict_loader(model, loader, self.prec, self.cfg.train.channels_last, loss_fn)
        if not self.ctx.enabled:
            return preds
        parts = distributed.gather(preds, self.ctx)
        n = sum(len(p["ids"]) for p in parts)
        merged: dict[str, Any] = {"loss": sum(p["loss"] * len(p["ids"]) for p in parts) / max(n, 1)}
        for key in ("logits", "targets"):
            merged[key] = np.stack(distributed.interleave([list(p[key]) for p in parts]))
        for key in ("ids", "patients"):
            merged[key] = distributed.interleave([p[key] for p in parts])
        return merged

    def _rank_report(self, model: torch.nn.Module, seen: list[str], loss: float) -> dict[str, Any]:
        """What each rank trained on this epoch and a check that all ranks hold the same weights."""
        mine = {"images": len(seen), "order": distributed.ids_digest(seen), "ids": seen,
                "weights": distributed.weights_digest(model), "loss": loss}
        ranks = distributed.gather(mine, self.ctx)
        digests = {r["weights"] for r in ranks}
        if len(digests) != 1:
            raise RuntimeError(f"processes hold different weights after the epoch ({len(digests)} versions); "
                               "distributed training diverged")
        id_sets = [set(r["ids"]) for r in ranks]
        return {"world_size": self.ctx.world_size, "weights_digest": digests.pop(),
                "train_loss": float(np.mean([r["loss"] for r in ranks])),  # equal shards: the global mean
                "shards": [{"rank": i, "images": r["images"], "order": r["order"], "train_loss": r["loss"]}
                           for i, r in enumerate(ranks)],
                "shards_overlap": sum(len(s) for s in id_sets) - len(set.union(*id_sets))}

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
        if self.ctx.is_main:
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


def starting_weights(pretrained: str | None) -> dict[str, str] | None:
    """What the card says of the weights a run started from (packaged source with its licence, or a file)."""
    if not pretrained:
        return None
    named = weight_source(pretrained)
    return named.card() if named else {"source": "file", "file": Path(pretrained).name}


def train(cfg: ExperimentConfig, callbacks: list[Callback] | None = None) -> Path:
    """Start a new run; returns its folder. Under torchrun, rank 0 creates the folder for all ranks."""
    ctx = distributed.init(resolve_device(cfg.train.device))
    try:
        run_dir = distributed.broadcast(new_run_dir(cfg) if ctx.is_main else None, ctx)
        return Trainer(cfg, run_dir, callbacks, ctx).fit()
    finally:
        distributed.close(ctx)


def find_run(run: str | os.PathLike) -> Path:
    """A run folder from its id or path."""
    run_dir = Path(run)
    if not run_dir.is_dir():
        run_dir = runs_dir() / str(run)
    if not (run_dir / "config.yaml").is_file():
        raise MedaiError(f"no run folder with a config.yaml at {run} (looked in {runs_dir()})")
    return run_dir


def resume(run: str | os.PathLike, callbacks: list[Callback] | None = None) -> Path:
    """Continue a run from its last completed epoch (after a cancel, crash or kill -9)."""
    run_dir = find_run(run)
    cfg = load_config(run_dir / "config.yaml")
    ctx = distributed.init(resolve_device(cfg.train.device))
    try:
        if ctx.is_main:
            (run_dir / CANCEL_FILE).unlink(missing_ok=True)
        return Trainer(cfg, run_dir, callbacks, ctx).fit()
    finally:
        distributed.close(ctx)


def _storage_failure(exc: BaseException, run_dir: Path) -> StorageError | None:
    """A write failure (full disk, file-size limit, read-only folder, permissions) as a StorageError that
    says how to go on; None for any other exception. safetensors reports I/O errors as its own type."""
    import errno

    codes = {errno.ENOSPC: "the disk is full", errno.EFBIG: "a file grew past the size limit",
             errno.EDQUOT: "the disk quota is used up", errno.EROFS: "the folder is on a read-only file system",
             errno.EACCES: "no permission to write there", errno.EPERM: "no permission to write there"}
    if isinstance(exc, OSError) and exc.errno in codes:
        why = codes[exc.errno]
    elif type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc):
        why = str(exc).split("I/O error:", 1)[1].strip()
    else:
        return None
    return StorageError(f"cannot write the run's files in {run_dir} ({why}; {exc}). The last completed epoch "
                        f"is kept: free space or fix the folder, then resume with "
                        f"`python -m medai train --resume {run_dir}`")

