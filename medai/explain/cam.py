"""Class activation maps for several findings at once, on top of pytorch-grad-cam.

pytorch-grad-cam computes the CAM of each method (``get_cam_image``); this module only decides which
activations and gradients it sees, so that N findings do not cost N forward passes:

- one forward pass records the target layer's activations;
- heads that are global average pooling + one linear layer (DenseNet121, ResNet-18) get each finding's
  gradient in closed form from the classifier weights: no backward pass at all;
- other heads (hybrid, ViT) get one backward pass per finding on the retained graph.

Every call works on its own copy of the model, so hooks and gradients never touch the shared model that
other sessions use for inference, and nothing is left behind even when a call fails.
"""

from __future__ import annotations

import copy
import functools
import types
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
import pytorch_grad_cam.score_cam as _score_cam
import tqdm as _tqdm
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM
from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from medai.errors import MedaiError
from medai.models.densenet import DenseNet121
from medai.models.registry import MedaiModel
from medai.models.resnet import ResNet18

# ScoreCAM draws a tqdm bar on stderr for every call; a server and the CLI want none.
_score_cam.tqdm = types.SimpleNamespace(tqdm=functools.partial(_tqdm.tqdm, disable=True))

CAM_METHODS = {
    "gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM,
    "eigencam": EigenCAM, "layercam": LayerCAM, "scorecam": ScoreCAM,
}
CLASS_AGNOSTIC = {"eigencam"}  # the same map for every finding
DEFAULT_METHOD = {"densenet121": "gradcam", "resnet18": "gradcam",
                  "hybrid_cnn_transformer": "gradcam", "vit": "gradcam"}


class ExplainError(MedaiError):
    pass


def default_method(architecture: str) -> str:
    return DEFAULT_METHOD.get("vit" if architecture.startswith("vit_") else architecture, "gradcam")


@dataclass
class CamResult:
    heatmaps: dict[int, np.ndarray]  # class index -> H x W in [0, 1] at the requested size
    logits: np.ndarray
    method: str
    backward_passes: int


def _linear_head_gradient(model: MedaiModel, activations: torch.Tensor, classes: list[int]) -> dict[int, np.ndarray] | None:
    """d logit_c / d A for heads that average-pool the target layer and apply one linear layer."""
    if isinstance(model, DenseNet121):
        mask = (activations > 0).float()  # forward_features applies ReLU after norm5
    elif isinstance(model, ResNet18):
        mask = torch.ones_like(activations)
    else:
        return None
    h, w = activations.shape[-2:]
    weight = model.classifier.weight.detach().float()
    return {c: (weight[c][None, :, None, None] / (h * w) * mask).numpy() for c in classes}


def resize_heatmap(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to (height, width), clipped to [0, 1]."""
    height, width = size
    if cam.shape == (height, width):
        return np.clip(cam.astype(np.float32), 0.0, 1.0)
    img = Image.fromarray(cam.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def compute_cams(model: MedaiModel, batch: torch.Tensor, classes: list[int], method: str = "gradcam",
                 output_size: tuple[int, int] | None = None) -> CamResult:
    """Heatmaps of ``classes`` for one preprocessed image ``batch`` (1 x 1 x S x S)."""
    if method not in CAM_METHODS:
        raise ExplainError(f"unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}")
    if batch.ndim != 4 or batch.shape[0] != 1:
        raise ExplainError("compute_cams explains one image at a time (batch of 1)")
    model = copy.deepcopy(model).eval()  # hooks and gradients stay on this private copy
    for p in model.parameters():
        p.requires_grad_(True)
    layers = model.cam_target_layers()
    reshape = model.cam_reshape_transform if model.uses_token_grid else None
    cam = CAM_METHODS[method](model=model, target_layers=layers, reshape_transform=reshape)
    recorder: ActivationsAndGradients = cam.activations_and_grads
    size = (batch.shape[-1], batch.shape[-2])  # pytorch-grad-cam wants (width, height)
    heatmaps: dict[int, np.ndarray] = {}
    backward = 0
    try:
        with torch.enable_grad():
            logits = recorder(batch)
            activations = recorder.activations[0]
            analytic = None if method in CLASS_AGNOSTIC else _linear_head_gradient(model, activations, classes)
            shared = None
            for c in classes:
                if method in CLASS_AGNOSTIC and shared is not None:
                    heatmaps[c] = shared
                    continue
                if analytic is not None:
                    grads = analytic[c]
                elif cam.uses_gradients:
                    recorder.gradients = []
                    model.zero_grad(set_to_none=True)
                    logits[0, c].backward(retain_graph=True)
                    backward += 1
                    grads = recorder.gradients[0].numpy()
                else:
                    grads = None
                raw = cam.get_cam_image(batch, layers[0], [ClassifierOutputTarget(c)], activations.numpy(), grads,
                                          eigen_smooth=False)
                raw = np.maximum(raw, 0)
                peak = raw.max()
                # CAM magnitudes are arbitrary; dividing by the peak first keeps scale_cam_image's 1e-7
                # epsilon from flattening maps whose raw values are tiny (weak gradients)
                scaled = scale_cam_image(raw / peak if peak > 0 else raw, size)
                heatmaps[c] = cam.aggregate_multi_layers([scaled[:, None, :]])[0]
                shared = heatmaps[c]
    finally:
        recorder.release()
    if output_size is not None:
        heatmaps = {c: resize_heatmap(h, output_size) for c, h in heatmaps.items()}
    return CamResult(heatmaps, logits.detach().float().numpy()[0], method, backward)
