"""Class activation maps for several findings at once, on top of pytorch-grad-cam.

pytorch-grad-cam computes the CAM of each method (``get_cam_image``); this module only decides which
activations and gradients it sees, so that N findings do not cost N forward passes:

- one forward pass records the target layer's activations;
- heads that are global average pooling + one linear layer (DenseNet121, ResNet-18) get each finding's
  gradient in closed form from the classifier weights: no backward pass at all;
- other heads (hybrid, ViT, EfficientNet-Lite explained at stride 16) get all findings' gradients from
  one batched backward pass: ``torch.func.vjp`` of the logits with respect to a zero probe added to the
  target layer's output, ``torch.func.vmap`` over the findings, whose batching rules run each backward
  operator once for all of them (the autograd engine's ``is_grads_batched`` looped over convolution
  backward here: 14 heatmaps 80 -> 53 ms); or one backward per finding where an operator has no rule.

Every call works on its own copy of the model, so hooks and gradients never touch the shared model that
other sessions use for inference, and nothing is left behind even when a call fails. The copy is fused for
inference where the architecture allows (``MedaiModel.fuse_for_inference``: BatchNorm folded into the
convolutions), which matters most where gradients pass back through many blocks.
"""

from __future__ import annotations

import copy
import functools
import threading
import types
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import pytorch_grad_cam.score_cam as _score_cam
import tqdm as _tqdm
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from medai.errors import MedaiError
from medai.imaging import resize_heatmap
from medai.models.registry import MedaiModel

# torch.func.vmap warns once per operator it batches by a loop (attention's backward); the result is exact
warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the "
                        "batching rule", category=UserWarning)
# ScoreCAM draws a tqdm bar on stderr for every call; a server and the CLI want none.
_score_cam.tqdm = types.SimpleNamespace(tqdm=functools.partial(_tqdm.tqdm, disable=True))

CAM_METHODS = {
    "gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM,
    "eigencam": EigenCAM, "layercam": LayerCAM, "scorecam": ScoreCAM,
}
CLASS_AGNOSTIC = {"eigencam"}  # the same map for every finding


class ExplainError(MedaiError):
    pass


@dataclass
class CamResult:
    heatmaps: dict[int, np.ndarray]  # class index -> H x W in [0, 1] at the requested size
    logits: np.ndarray
    method: str
    backward_passes: int


class LogSoftmaxTarget:
    """The log-probability of one class of a softmax head: the evidence for it *against* the others.

    A softmax model only learns logit differences, so the raw logit of a class can fall while its
    probability rises; explaining the raw logit then gives empty or inverted maps."""

    def __init__(self, category: int):
        self.category = category

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model_output, dim=-1)[..., self.category]


def _linear_head_gradient(model: MedaiModel, activations: torch.Tensor, classes: list[int],
                          probs: np.ndarray | None) -> dict[int, np.ndarray] | None:
    """d score_c / d A for heads that average-pool the target layer and apply one linear layer; the score
    is the logit, or with ``probs`` (softmax heads) the log-probability: W_c - sum_k p_k W_k."""
    mask = model.cam_linear_head_mask(activations)
    if mask is None:
        return None
    h, w = activations.shape[-2:]
    weight = model.classifier.weight.detach().float()
    if probs is not None:
        weight = weight - torch.as_tensor(probs, dtype=weight.dtype) @ weight
    return {c: (weight[c][None, :, None, None] / (h * w) * mask).numpy() for c in classes}


def _gradients(model: MedaiModel, logits: torch.Tensor, activations: torch.Tensor, pullback: Callable,
               classes: list[int], method: str, cam, reshape, softmax: bool) -> tuple[dict[int, np.ndarray], int]:
    """d score_c / d activations for each class, and how many backward passes that took."""
    if method in CLASS_AGNOSTIC or not cam.uses_gradients:
        return {}, 0
    probs = torch.softmax(logits.detach().float(), dim=1)[0] if softmax else None
    closed_form = _linear_head_gradient(model, activations, classes, None if probs is None else probs.numpy())
    if closed_form is not None:
        return closed_form, 0
    rows = torch.zeros(len(classes), *logits.shape, dtype=logits.dtype, device=logits.device)
    rows[range(len(classes)), 0, classes] = 1
    if probs is not None:  # d log p_c / d z = e_c - p
        rows -= probs.to(logits.dtype)
    grads, passes = _pull_back(pullback, rows)
    return {c: (reshape(g) if reshape is not None else g).numpy() for c, g in zip(classes, grads)}, passes


def _pull_back(pullback: Callable, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every finding's gradient at the target layer: one vmapped backward pass (batching rules run each
    backward operator once for all findings), or one pass per finding where an operator has none."""
    try:
        (grads,) = torch.func.vmap(pullback)(rows)
        return grads.detach(), 1
    except (RuntimeError, NotImplementedError):
        return torch.stack([pullback(row)[0].detach() for row in rows]), len(rows)


def _recorded_forward(model: MedaiModel, layer: torch.nn.Module, batch: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, Callable]:
    """One forward pass: the logits, the target layer's output, and the pull-back from cotangents of the
    logits to gradients at that output (``torch.func.vjp`` with respect to a zero probe added to it)."""
    captured: dict[str, torch.Tensor] = {}

    def add_probe(_m, _i, out: torch.Tensor) -> torch.Tensor:
        captured["out"] = out
        return out + captured["probe"]

    def logits_of(probe: torch.Tensor) -> torch.Tensor:
        captured["probe"] = probe
        return model(batch)

    probe = torch.zeros(_output_shape(model, layer, batch), dtype=batch.dtype, device=batch.device)
    hook = layer.register_forward_hook(add_probe)
    try:
        logits, pullback = torch.func.vjp(logits_of, probe)
    finally:
        hook.remove()
    return logits.detach(), captured["out"].detach(), pullback


_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model copy -> {input shape: output shape}


def _output_shape(model: MedaiModel, layer: torch.nn.Module, batch: torch.Tensor) -> torch.Size:
    """The target layer's output shape for inputs shaped like ``batch`` (one forward pass, then cached)."""
    shapes = _SHAPES.setdefault(model, {})
    if batch.shape not in shapes:
        captured = {}

        def record(_m, _i, out: torch.Tensor) -> None:  # a hook that returned a value would replace the output
            captured["shape"] = out.shape
        hook = layer.register_forward_hook(record)
        try:
            with torch.no_grad():
                model(batch)
        finally:
            hook.remove()
        shapes[batch.shape] = captured["shape"]
    return shapes[batch.shape]


_THREAD = threading.local()


def private_copy(model: MedaiModel) -> MedaiModel:
    """This thread's own copy of ``model`` for CAM hooks and gradients, made on first use and remade when
    the model's weights or buffers change in place (their version counters move). Concurrent callers
    never share a copy, and the shared model never sees a hook."""
    version = tuple(t._version for t in (*model.parameters(), *model.buffers()))
    copies = getattr(_THREAD, "copies", None)
    if copies is None:
        copies = _THREAD.copies = weakref.WeakKeyDictionary()
    cached = copies.get(model)
    if cached is None or cached[0] != version:
        clone = copy.deepcopy(model).eval()
        clone.fuse_for_inference()  # BatchNorm folded: fewer operators forward and in the backward passes
        for p in clone.parameters():  # gradients are taken at the target layer only (_recorded_forward)
            p.requires_grad_(False)
        copies[model] = cached = (version, clone)
    return cached[1]


def smooth_grid(grid: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of the last two axes of ``grid`` (a heatmap at its layer's resolution), ``sigma`` in
    grid cells, edges reflected; 0 returns ``grid``. About one cell moves the peak of a stride-16 map into
    more of the radiologists' boxes (benchmarks/RESULTS.md)."""
    if sigma <= 0:
        return grid
    rows, cols = (_blur_matrix(n, sigma) for n in grid.shape[-2:])
    return (rows @ grid.astype(np.float32) @ cols.T).astype(np.float32)


@functools.lru_cache(maxsize=16)  # one per grid size and width: built once, not for every finding of every image
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """The n x n matrix of a 1-D Gaussian blur (taps to 4 sigma) with the edges reflected (d c b a | a b c d)."""
    radius = max(1, int(4 * sigma + 0.5))
    offsets = np.arange(-radius, radius + 1)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    taps /= taps.sum()
    source = (np.arange(n)[:, None] + offsets) % (2 * n)
    source = np.where(source < n, source, 2 * n - 1 - source)
    matrix = np.zeros((n, n), np.float32)
    np.add.at(matrix, (np.repeat(np.arange(n), len(offsets)), source.ravel()), np.tile(taps, n))
    matrix.flags.writeable = False  # shared by every caller
    return matrix


def compute_cams(model: MedaiModel, batch: torch.Tensor, classes: list[int] | Callable[[np.ndarray], list[int]],
                 method: str = "gradcam", output_size: tuple[int, int] | None = None,
                 softmax: bool = False) -> CamResult:
    """Heatmaps of ``classes`` for one preprocessed image ``batch`` (1 x 1 x S x S).

    ``classes`` may be a function of the logits (one image's, as numpy) that picks the classes to explain:
    the forward pass that records the activations then also serves the prediction, so a caller that has
    not predicted yet needs no second forward pass. ``softmax=True`` (multiclass models) explains each
    class's log-probability instead of its raw logit."""
    if method not in CAM_METHODS:
        raise ExplainError(f"unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}")
    if batch.ndim != 4 or batch.shape[0] != 1:
        raise ExplainError("compute_cams explains one image at a time (batch of 1)")
    model = private_copy(model)  # hooks and gradients stay on this thread's own copy
    layers = model.cam_target_layers()
    reshape = model.cam_reshape_transform if model.uses_token_grid else None
    cam = CAM_METHODS[method](model=model, target_layers=layers, reshape_transform=reshape)
    cam.activations_and_grads.release()  # activations and gradients are recorded below instead
    size = (batch.shape[-1], batch.shape[-2])  # pytorch-grad-cam wants (width, height)
    logits, layer_out, pullback = _recorded_forward(model, layers[0], batch)
    if callable(classes):
        classes = classes(logits.float().numpy()[0])
    activations = reshape(layer_out) if reshape is not None else layer_out
    gradients, backward = _gradients(model, logits, activations, pullback, classes, method, cam, reshape, softmax)
    target = LogSoftmaxTarget if softmax else ClassifierOutputTarget
    heatmaps: dict[int, np.ndarray] = {}
    for c in classes:
        if method in CLASS_AGNOSTIC and heatmaps:
            heatmaps[c] = next(iter(heatmaps.values()))
            continue
        raw = cam.get_cam_image(batch, layers[0], [target(c)], activations.numpy(),
                                gradients.get(c), eigen_smooth=False)
        raw = smooth_grid(np.maximum(raw, 0), model.cam_smooth)
        peak = raw.max()
        # CAM magnitudes are arbitrary; dividing by the peak first keeps scale_cam_image's 1e-7
        # epsilon from flattening maps whose raw values are tiny (weak gradients)
        scaled = scale_cam_image(raw / peak if peak > 0 else raw, size)
        heatmaps[c] = cam.aggregate_multi_layers([scaled[:, None, :]])[0]
    if output_size is not None:
        heatmaps = {c: resize_heatmap(h, output_size) for c, h in heatmaps.items()}
    return CamResult(heatmaps, logits.float().numpy()[0], method, backward)
