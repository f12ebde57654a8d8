"""Data-parallel training on PyTorch's own engine: ``torch.distributed`` + DistributedDataParallel under
``torchrun``, on one node or many.

``torchrun`` starts one process per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous; :func:`init` reads them and joins the process group (``nccl`` for CUDA tensors, ``gloo`` for
CPU tensors). A plain ``python -m medai train`` is a world of one and never touches torch.distributed.

Who does what in a run of N processes:
- every rank trains on its own shard of each epoch (DistributedSampler, reshuffled per epoch, shards
  disjoint) and predicts its shard of the validation set;
- the validation predictions are gathered and put back in dataset order, so AUROC is computed on all
  scores exactly as in a single process;
- rank 0 alone decides early stopping / best epoch and broadcasts the decision, and alone writes the
  checkpoint, ``last.pt``, progress, status and log;
- a cancel request (file or SIGTERM) seen by any rank stops all ranks at the same step.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from medai.errors import ConfigError, MedaiError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" or "nccl" for the training device; None in a world of one

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def under_torchrun() -> bool:
    return all(k in os.environ for k in TORCHRUN_ENV)


def init(device: torch.device) -> DistContext:
    """Join the process group torchrun set up (once per process); a world of one needs none."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return SINGLE
    if not dist.is_available():
        raise MedaiError("this PyTorch build has no torch.distributed; run without torchrun")
    rank, world, local = (int(os.environ[k]) for k in TORCHRUN_ENV)
    cuda = device.type == "cuda"
    if cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local} has no GPU (this node has {torch.cuda.device_count()}); "
                              "lower --nproc-per-node")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        # nccl reduces CUDA tensors, gloo CPU ones; a CUDA node gets both so small CPU objects work too
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=dt.timedelta(minutes=float(os.environ.get(
            "MEDAI_DIST_TIMEOUT_MIN", "30"))))
    return DistContext(rank, world, local, "nccl" if cuda else "gloo")


def device_for(device: torch.device, ctx: DistContext) -> torch.device:
    """Each rank drives the GPU of its local rank."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def close(ctx: DistContext, finished: bool = False) -> None:
    """Leave the process group. ``finished`` (this rank's work ended normally, as on every rank): first wait
    for every rank, so that no rank tears its gloo connections down while a peer still uses them; a finished
    rank torn down that way could abort at exit (SIGABRT: "terminate called without an active exception").
    After a failure there is no barrier: the peers may be waiting in another collective."""
    if ctx.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def broadcast(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank (any picklable object)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True on every rank when it is True on at least one (e.g. a cancel request)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sync_buffers(model: torch.nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP broadcasts them before each
    forward, so after an epoch's last step each rank still holds its own; after this, every rank's model
    equals rank 0's, which is the one that is validated and saved."""
    if ctx.enabled:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def interleave(parts: list[list[Any]]) -> list[Any]:
    """Undo ``items[rank::world]`` sharding: the items back in their original order."""
    out: list[Any] = []
    for i in range(max((len(p) for p in parts), default=0)):
        out.extend(p[i] for p in parts if i < len(p))
    return out


def weights_digest(model: torch.nn.Module | dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict (names, dtypes, shapes, bytes): equal digests, equal weights."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def lr_scale(rule: str, world_size: int) -> float:
    """Learning-rate factor for ``world_size`` processes: none, linear (Goyal et al. 2017) or sqrt."""
    return {"none": 1.0, "linear": float(world_size), "sqrt": math.sqrt(world_size)}[rule]


def torchrun_command(nproc: int, medai_args: list[str]) -> list[str]:
    """The single-node torchrun command line that runs ``python -m medai <medai_args>`` on ``nproc``
    processes (``--standalone``: local rendezvous on a free port)."""
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    launcher = [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", f"--nproc-per-node={nproc}", "-m", "medai", *medai_args]


def check_nproc(nproc: int, device: torch.device) -> None:
    """Refuse a local process count the node cannot serve."""
    if nproc < 1:
        raise ConfigError("config key 'train.nproc_per_node' must be >= 1")
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(f"config key 'train.nproc_per_node': {nproc} processes need {nproc} GPUs, this "
                          f"machine has {torch.cuda.device_count()}")
    if device.type == "cpu" and nproc > (os.cpu_count() or 1):
        raise ConfigError(f"config key 'train.nproc_per_node': {nproc} CPU processes on "
                          f"{os.cpu_count()} cores would only contend; use at most {os.cpu_count()}")


def gather_predictions(preds: dict[str, Any], ctx: DistContext) -> dict[str, Any]:
    """Every rank's share of the validation predictions (each took every world_size-th image), merged
    back into dataset order, on every rank."""
    parts = gather(preds, ctx)
    n = sum(len(p["ids"]) for p in parts)
    merged: dict[str, Any] = {"loss": sum(p["loss"] * len(p["ids"]) for p in parts) / max(n, 1)}
    for key in ("logits", "targets"):
        merged[key] = np.stack(interleave([list(p[key]) for p in parts]))
    for key in ("ids", "patients"):
        merged[key] = interleave([p[key] for p in parts])
    return merged


def rank_report(model: torch.nn.Module, seen: list[str], loss: float, ctx: DistContext) -> dict[str, Any]:
    """What each rank trained on this epoch and a check that all ranks hold the same weights."""
    mine = {"images": len(seen), "order": ids_digest(seen), "ids": seen, "weights": weights_digest(model),
            "loss": loss}
    ranks = gather(mine, ctx)
    digests = {r["weights"] for r in ranks}
    if len(digests) != 1:
        raise RuntimeError(f"processes hold different weights after the epoch ({len(digests)} versions); "
                           "distributed training diverged")
    id_sets = [set(r["ids"]) for r in ranks]
    return {"world_size": ctx.world_size, "weights_digest": digests.pop(),
            "train_loss": float(np.mean([r["loss"] for r in ranks])),  # equal shards: the global mean
            "shards": [{"rank": i, "images": r["images"], "order": r["order"], "train_loss": r["loss"]}
                       for i, r in enumerate(ranks)],
            "shards_overlap": sum(len(s) for s in id_sets) - len(set.union(*id_sets))}
