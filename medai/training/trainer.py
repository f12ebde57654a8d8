"""Run orchestration: data, model, epochs with early stopping and two-stage fine-tuning, resume after a
crash, and the final evaluation that fills the checkpoint's model card (:mod:`medai.training.card`).

The run folder and its states are :mod:`medai.runs`'s. Under ``torchrun`` the same code trains
data-parallel (see :mod:`medai.training.distributed`): rank 0 owns the run folder, every rank trains on
its shard.

:meth:`Trainer.fit` reads top to bottom: set up, then per epoch train, validate, decide (best? stop?),
save and report; then the final evaluation, or the failure and what to do about it.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from medai import runs
from medai.config import ExperimentConfig
from medai.data.cache import DecodeCache
from medai.data.datasets import Record, XrayDataset, cap_records, load_records
from medai.data.mixing import extra_train_records
from medai.data.transforms import PreprocessSpec, build_augmentation
from medai.errors import DatasetError, StorageError
from medai.evaluation.calibration import probs_from_logits
from medai.evaluation.metrics import quick_scores
from medai.evaluation.predict import predict_loader
from medai.models import create_model
from medai.models.checkpoint import new_card
from medai.models.registry import model_kwargs as sized_kwargs
from medai.paths import cache_dir
from medai.precision import resolve_device, resolve_precision
from medai.training import attention, card, distributed, resume_state
from medai.training.callbacks import Callback, ProgressFile, StatusFile
from medai.training.distributed import SINGLE, DistContext
from medai.training.ema import WeightAverage
from medai.training.loop import (EarlyStopping, StepClock, loader_worker_init, lr_factor, make_loss,
                                 train_one_epoch)
from medai.training.sampling import PatientBalancedSampler, effective_films, film_weights

log = logging.getLogger(__name__)


@dataclass
class _Setup:
    """Everything an epoch needs, built once by :meth:`Trainer._setup`."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: torch.nn.Module
    train: list[Record]
    val_loader: DataLoader
    steps_per_epoch: int
    total_steps: int
    warmup: int
    base_lr: float
    state: dict[str, Any]  # epoch, step, stopper (what last.pt keeps)
    clock: StepClock
    stopper: EarlyStopping
    ema: WeightAverage | None  # train.ema_decay > 0: the averaged weights, validated and kept as the best

    @property
    def kept(self) -> torch.nn.Module:
        """The model that is validated and saved: the weight average when there is one."""
        return self.ema.module if self.ema else self.model


class Trainer:
    def __init__(self, cfg: ExperimentConfig, run_dir: Path, callbacks: list[Callback] | None = None,
                 ctx: DistContext = SINGLE):
        self.cfg, self.run_dir, self.ctx = cfg, run_dir, ctx
        self.callbacks: list[Callback] = []
        if ctx.is_main:  # only rank 0 writes progress, status and the log
            self.callbacks = [ProgressFile(run_dir), StatusFile(run_dir),
                              *(callbacks or [])]
        self._stop_reason: str | None = None
        self._stage: bool | None = None

    # ------------------------------------------------------------------------------------------ set-up
    def _data(self) -> tuple[Any, list[Record], list[Record]]:
        d = self.cfg.data
        recset = load_records(d)
        train = cap_records(recset.split(d.train_split) + extra_train_records(d, recset), d.max_samples, d.split_seed)
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
                         build_augmentation(self.cfg.augment) if train else None, self._masks if train else None)
        gen = torch.Generator().manual_seed(t.seed * 1000 + epoch)
        sampler = None
        if train and t.patient_balance > 0:
            sampler = PatientBalancedSampler([r.patient_id for r in records], t.patient_balance, t.seed,
                                             self.ctx.rank, self.ctx.world_size)
            sampler.set_epoch(epoch)
        elif train and self.ctx.enabled:
            # disjoint shards, reshuffled per epoch; drop_last keeps every rank at the same step count
            # without padding a shard with another rank's images
            sampler = DistributedSampler(ds, self.ctx.world_size, self.ctx.rank, shuffle=True, seed=t.seed,
                                         drop_last=True)
            sampler.set_epoch(epoch)
        return DataLoader(ds, batch_size=t.batch_size if train else t.batch_size * 2,
                          shuffle=train and sampler is None, sampler=sampler, generator=gen,
                          num_workers=t.num_workers, drop_last=False,
                          pin_memory=self.prec.device.type == "cuda", persistent_workers=False,
                          worker_init_fn=loader_worker_init if t.num_workers else None)

    def _request_stop(self, signum: int, _frame: Any) -> None:
        self._stop_reason = f"signal {signal.Signals(signum).name}"

    def _should_stop(self) -> bool:
        """Cancel file or signal; under torchrun a request seen by any rank stops every rank."""
        if self._stop_reason is None and self.ctx.is_main and runs.cancel_requested(self.run_dir):
            self._stop_reason = "cancel requested"
        if distributed.any_rank(self._stop_reason is not None, self.ctx, self.prec.device):
            self._stop_reason = self._stop_reason or "stop requested by another process"
            return True
        return False

    # ------------------------------------------------------------------------------------------ run
    def fit(self) -> Path:
        if not self.ctx.is_main:
            return self._fit()
        handler = logging.FileHandler(self.run_dir / runs.TRAIN_LOG)
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
        run = self._setup()
        # SIGTERM cancels like cancel.request, for this run only: the previous handler comes back after it
        # (a handler left in place would also keep this trainer, its DDP wrapper and process group alive)
        previous = signal.signal(signal.SIGTERM, self._request_stop)
        self._start(run)
        end_state, summary = runs.FINISHED, {}
        try:
            for epoch in range(run.state["epoch"], self.cfg.train.epochs):
                end_state = self._epoch(run, epoch)
                if end_state != runs.RUNNING:
                    break
            end_state = runs.FINISHED if end_state == runs.RUNNING else end_state
            summary = self._finish(run, end_state)
        except BaseException as exc:
            self._fail(exc)
        finally:
            signal.signal(signal.SIGTERM, previous)
        for cb in self.callbacks:
            cb.on_train_end(end_state, {"message": self._stop_reason or "", **summary})
        return self.run_dir

    # ------------------------------------------------------------------------------------------ steps
    def _setup(self) -> _Setup:
        cfg, t, ctx = self.cfg, self.cfg.train, self.ctx
        torch.manual_seed(t.seed)
        torch.use_deterministic_algorithms(t.deterministic, warn_only=True)
        self.prec = resolve_precision(t.amp, distributed.device_for(resolve_device(t.device), ctx))
        self.spec = PreprocessSpec(cfg.preprocess.image_size, cfg.preprocess.mean, cfg.preprocess.std)
        recset, train, val = self._data()
        self._masks = attention.chest_masks(cache_dir(), self.spec.image_size) if t.attention_loss else None
        self.labels, self.kind = recset.labels, recset.kind
        kwargs = sized_kwargs(cfg.model.name, cfg.model.kwargs, self.spec.image_size)
        model, sync_bn = self._model(kwargs)
        loss_fn = make_loss(self.kind, np.stack([r.target for r in train]), t, self.prec.device)
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)
        per_process = len(train) // ctx.world_size if ctx.enabled else len(train)
        steps_per_epoch = math.ceil(per_process / t.batch_size)
        if t.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
        total_steps = steps_per_epoch * t.epochs
        ema = WeightAverage(model, t.ema_decay, t.ema_ramp) if t.ema_decay else None
        state = resume_state.load(self.run_dir, model, optimizer, ema, self.prec.device, ctx.is_main)
        base_lr = t.lr * distributed.lr_scale(t.lr_scaling, ctx.world_size)
        self.card_base = card.card_base(cfg, recset, train, val, kwargs, self.spec.to_dict(), {
            "world_size": ctx.world_size, "backend": ctx.backend, "per_process_batch": t.batch_size,
            "effective_batch": t.batch_size * ctx.world_size, "lr_scaling": t.lr_scaling, "base_lr": t.lr,
            "effective_lr": base_lr, "sync_batchnorm": sync_bn})
        # each process predicts every world_size-th validation image; the predictions are gathered
        self._val = val
        return _Setup(model, optimizer, loss_fn, train, self._loader(val[ctx.rank::ctx.world_size], False),
                      steps_per_epoch, total_steps, int(t.warmup_epochs * steps_per_epoch), base_lr, state,
                      StepClock(step=state["step"], total_steps=total_steps, world_size=ctx.world_size),
                      EarlyStopping(t.early_stopping_patience, t.early_stopping_min_delta, **state["stopper"]), ema)

    def _model(self, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, bool]:
        t, ctx = self.cfg.train, self.ctx
        model = create_model(self.cfg.model.name, len(self.labels), pretrained=self.cfg.model.pretrained, **kwargs)
        model.to(self.prec.device)
        if t.channels_last:
            model.to(memory_format=torch.channels_last)
        sync_bn = t.sync_batchnorm and ctx.enabled and self.prec.device.type == "cuda"
        if t.sync_batchnorm and ctx.enabled and not sync_bn:
            log.warning("train.sync_batchnorm needs CUDA; CPU processes keep per-process BatchNorm statistics")
        if sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model, sync_bn

    def _lr_at(self, run: _Setup, step: int) -> float:
        t = self.cfg.train
        stage = t.finetune_lr_factor if (t.head_epochs and step >= t.head_epochs * run.steps_per_epoch) else 1.0
        return run.base_lr * stage * lr_factor(step, run.total_steps, run.warmup, t.min_lr_ratio)

    def _start(self, run: _Setup) -> None:
        t = self.cfg.train
        info = {"run_id": self.run_dir.name, "total_steps": run.total_steps, "start_step": run.state["step"],
                "epochs": t.epochs, "precision": self.prec.name, "device": str(self.prec.device),
                "world_size": self.ctx.world_size}
        for cb in self.callbacks:
            cb.on_train_start(info)
        log.info("run %s: %s on %s (%s), %d train / %d val images, %d labels, %d process(es)",
                 self.run_dir.name, self.cfg.model.name, self.prec.device, self.prec.name, len(run.train),
                 len(self._val), len(self.labels), self.ctx.world_size)
        if t.patient_balance > 0:
            patients = [r.patient_id for r in run.train]
            log.info("patient-balanced sampling (power %g): %d patients, worth %.0f equally drawn films per epoch",
                     t.patient_balance, len(set(patients)), effective_films(film_weights(patients, t.patient_balance)))

    def _epoch(self, run: _Setup, epoch: int) -> str:
        """Train one epoch, validate, decide; the run's state afterwards (running, or why it ends)."""
        t, ctx = self.cfg.train, self.ctx
        net = self._set_stage(run.model, epoch)
        # per rank: each process draws its own augmentation and dropout (rank 0 = one process)
        torch.manual_seed(t.seed * 1000 + epoch + 7919 * ctx.rank)
        started = time.perf_counter()
        seen: list[str] | None = [] if ctx.enabled else None
        result = train_one_epoch(net, self._loader(run.train, True, epoch), run.optimizer, run.loss_fn, self.prec,
                                 t, run.clock, epoch, lambda step: self._lr_at(run, step), self._emit_step,
                                 self._should_stop, seen, (lambda: run.ema.update(run.model)) if run.ema else None,
                                 attention.term(run.model, self.kind, attention.method_for(self.cfg.model.cam_method))
                                 if t.attention_loss else None)
        if result.get("stopped"):
            return runs.CANCELLED
        for synced in {id(m): m for m in (run.model, run.kept)}.values():
            distributed.sync_buffers(synced, ctx)
        preds = self._predict_val(run.kept, run.val_loader, run.loss_fn)
        scores, improved = self._decide(run, preds, epoch)
        if ctx.is_main and (improved or t.keep_epochs):
            card.save_weights(run.kept, new_card(**self.card_base), self.run_dir, epoch, best=improved,
                              keep=t.keep_epochs)
        record = {"type": "epoch", "epoch": epoch, "step": run.clock.step, "train_loss": result["loss"],
                  "val_loss": preds["loss"], "val_auroc": scores["auroc"], "val_map": scores["map"],
                  "lr": self._lr_at(run, max(run.clock.step - 1, 0)), "images_per_s": run.clock.images_per_s(),
                  "epoch_time_s": time.perf_counter() - started, "eta_s": run.clock.eta_s(),
                  "best_val_auroc": run.stopper.best, "improved": improved, "time": time.time()}
        if t.attention_loss:  # the heatmap share outside the chest this epoch, or a warning that none counted
            attention.report(result, record, epoch)
        if ctx.enabled:
            record.update(distributed.rank_report(run.model, seen or [], result["loss"], ctx))
        if run.ema:  # what the average gained over the live weights, for the log
            record["val_auroc_live"] = self._live_auroc(run)
        run.state.update(epoch=epoch + 1, step=run.clock.step, stopper=run.stopper.state())
        if ctx.is_main:
            resume_state.save(self.run_dir, run.model, run.optimizer, run.ema, run.state)
        for cb in self.callbacks:
            cb.on_epoch(record)
        if run.stopper.should_stop:
            log.info("early stopping after epoch %d (best %.4f at epoch %d)", epoch + 1,
                     run.stopper.best, run.stopper.best_epoch + 1)
            return runs.FINISHED
        return runs.CANCELLED if self._should_stop() else runs.RUNNING

    def _live_auroc(self, run: _Setup) -> float | None:
        preds = self._predict_val(run.model, run.val_loader, run.loss_fn)
        if not self.ctx.is_main:
            return None
        return quick_scores(preds["targets"], probs_from_logits(preds["logits"], self.kind))["auroc"]

    def _decide(self, run: _Setup, preds: dict, epoch: int) -> tuple[dict[str, float], bool]:
        """Scores and early stopping, decided once on rank 0 over all gathered predictions, then broadcast."""
        t = self.cfg.train
        decision = None
        if self.ctx.is_main:
            scores = quick_scores(preds["targets"], probs_from_logits(preds["logits"], self.kind))
            improved = run.stopper.update(scores["auroc"], epoch)
            decision = {"scores": scores, "improved": improved, "stopper": run.stopper.state()}
        decision = distributed.broadcast(decision, self.ctx)
        run.stopper = EarlyStopping(t.early_stopping_patience, t.early_stopping_min_delta, **decision["stopper"])
        return decision["scores"], decision["improved"]

    def _finish(self, run: _Setup, end_state: str) -> dict[str, Any]:
        summary: dict[str, Any] = {"best_epoch": run.stopper.best_epoch, "best_val_auroc": run.stopper.best,
                                   "epochs_done": run.state["epoch"]}
        if end_state == runs.FINISHED and self.ctx.is_main:
            val_loader = self._loader(self._val, False) if self.ctx.enabled else run.val_loader
            summary.update(card.final_evaluation(self.cfg, self.run_dir, self.prec, self.labels, self.kind,
                                                 val_loader, lambda recs: self._loader(recs, False)))
        return summary

    def _fail(self, exc: BaseException) -> None:
        """Record why the run ended (cancelled on Ctrl-C, failed otherwise) and re-raise; a storage failure
        is raised as a StorageError that says how to go on, without a traceback."""
        storage = runs.storage_failure(exc, self.run_dir)
        reason = ("interrupted" if isinstance(exc, KeyboardInterrupt) else str(storage) if storage
                  else f"{type(exc).__name__}: {exc}")
        if storage:  # the cause is outside the program: no traceback, say what to do
            log.error("run %s failed: %s", self.run_dir.name, storage)
        else:
            log.exception("run %s failed", self.run_dir.name)
        for cb in self.callbacks:
            try:
                cb.on_train_end(runs.CANCELLED if isinstance(exc, KeyboardInterrupt) else runs.FAILED,
                                {"error": reason})
            except OSError as write_error:  # the same full disk may refuse the status file too
                log.error("could not record the failure in %s: %s", self.run_dir.name, write_error)
        if storage:
            raise storage from None
        raise exc

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
        return distributed.gather_predictions(preds, self.ctx) if self.ctx.enabled else preds


def train(cfg: ExperimentConfig, callbacks: list[Callback] | None = None) -> Path:
    """Create a run and train it; returns its folder. Under torchrun, rank 0 creates the folder for all."""
    ctx = distributed.init(resolve_device(cfg.train.device))
    try:
        run_dir = distributed.broadcast(runs.new_run(cfg) if ctx.is_main else None, ctx)
        return _fit_then_leave(cfg, run_dir, callbacks, ctx)
    finally:
        distributed.close(ctx)


def _fit_then_leave(cfg: ExperimentConfig, run_dir: Path, callbacks: list[Callback] | None,
                    ctx: distributed.DistContext) -> Path:
    """Train on this rank; once every rank is done, leave the process group (see ``distributed.close``)."""
    out = Trainer(cfg, run_dir, callbacks, ctx).fit()
    distributed.close(ctx, finished=True)
    return out


def start(run: str | os.PathLike, callbacks: list[Callback] | None = None) -> Path:
    """Train a run folder created (queued) earlier, from its first epoch: how the job system starts a run."""
    return _run_folder(run, callbacks, fresh=True)


def resume(run: str | os.PathLike, callbacks: list[Callback] | None = None) -> Path:
    """Continue a run from its last completed epoch (after a cancel, crash or kill -9)."""
    return _run_folder(run, callbacks, fresh=False)


def _run_folder(run: str | os.PathLike, callbacks: list[Callback] | None, fresh: bool) -> Path:
    run_dir = runs.find_run(run)
    if fresh and (run_dir / runs.RESUME_STATE).exists():
        raise StorageError(f"{run_dir.name} has already trained epochs; continue it with --resume")
    cfg = runs.load_run_config(run_dir)
    ctx = distributed.init(resolve_device(cfg.train.device))
    try:
        if ctx.is_main:
            runs.clear_cancel(run_dir)
            if fresh:
                runs.truncate_progress(run_dir, 0)
        return _fit_then_leave(cfg, run_dir, callbacks, ctx)
    finally:
        distributed.close(ctx)

