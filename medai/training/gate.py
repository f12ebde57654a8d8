"""Fitting the input gate (``medai/gate.py``) on the real images of ``../shared/data``, and the image sets
its benchmark scores it on.

Every set is ``fit`` (used to fit), ``held-out`` (same kind, images never used) or ``held-out kind``
(a kind of image the gate never saw). Choices are fixed by hashes of file names, so every machine picks
the same images. Made-up images are made honestly from real ones or drawn: rotated chest films and small
crops of them (wrong orientation, a detail) and rendered text pages and noise textures for fitting;
natural photographs (scikit-learn's two sample photos, cropped), geometric drawings, the tibia
radiograph and a brain MRI class left out of fitting are kept for evaluation only (as are upside-down
films of other patients: a first fit that saw only 90/270-degree turns passed films turned by 180).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medai.data.io import decode_image
from medai.imaging import resize_float

Loader = Callable[[], np.ndarray]


@dataclass
class ImageSet:
    name: str
    kind: str  # chest_xray | brain_mri | other
    role: str  # fit | held-out | held-out kind
    loaders: list[Loader]


def _pick(paths: list[Path], share: float, salt: str, keep: bool) -> list[Path]:
    def bucket(p: Path) -> float:
        return int(hashlib.sha256(f"{salt}:{p.name}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return [p for p in sorted(paths) if (bucket(p) < share) == keep]


def _images(folder: Path) -> list[Path]:
    """PNG and JPEG files under ``folder`` (any depth), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})


def _decoded(path: Path) -> Loader:
    return lambda: decode_image(path).pixels


def _transformed(path: Path, fn: Callable[[np.ndarray, int], np.ndarray], seed: int) -> Loader:
    return lambda: fn(decode_image(path).pixels, seed)


def _rotate(x: np.ndarray, seed: int) -> np.ndarray:
    return np.rot90(x, k=(1, 2, 3)[seed % 3]).copy()


def _crop(x: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = x.shape
    side = int(min(h, w) * rng.uniform(0.2, 0.35))
    y0, x0 = rng.integers(0, h - side), rng.integers(0, w - side)
    return x[y0:y0 + side, x0:x0 + side].copy()


def _document(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = Image.new("L", (512, 660), int(rng.integers(220, 256)))
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(20, 60))
    words = "patient study report findings impression lungs clear heart size normal no acute".split()
    while y < 620:
        line = " ".join(rng.choice(words, size=int(rng.integers(3, 12))))
        draw.text((int(rng.integers(20, 60)), y), line, fill=int(rng.integers(0, 60)))
        y += int(rng.integers(12, 30))
    return np.asarray(img, dtype=np.float32) / 255


def _texture(seed: int) -> np.ndarray:
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    x = ndi.gaussian_filter(rng.normal(size=(256, 256)), rng.uniform(1, 12))
    return ((x - x.min()) / max(np.ptp(x), 1e-6)).astype(np.float32)


def _shapes(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = Image.new("L", (256, 256), int(rng.integers(0, 256)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):
        box = sorted(rng.integers(0, 256, 2)), sorted(rng.integers(0, 256, 2))
        xy = [int(box[0][0]), int(box[1][0]), int(box[0][1]) + 1, int(box[1][1]) + 1]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(xy, fill=int(rng.integers(0, 256)))
    return np.asarray(img, dtype=np.float32) / 255


def _photo(seed: int) -> np.ndarray:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rgb = photos[seed % len(photos)].astype(np.float32) / 255
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    crop = _crop(grey, seed) if seed % 3 else grey
    return resize_float(crop, (256, 256)) if min(crop.shape) > 256 else crop


def _drawn(fn: Callable[[int], np.ndarray], seeds: range) -> list[Loader]:
    return [lambda s=s: fn(s) for s in seeds]


def image_sets(data: Path, per_set: int = 400) -> Iterator[ImageSet]:
    """The fitting and evaluation sets, from the shared data folder (sets whose folder is missing are
    left out)."""
    nih = _images(data / "nih-cxr14-train-224" / "images")
    nih_fit = _pick(nih, 0.08, "gate", True)[:per_set * 2]
    kermany = _images(data / "kermany-pneumonia" / "train")
    jsrt = sorted((data / "jsrt-scr-masks" / "images").glob("*.png"))
    from medai.training.segmentation import split_of

    yield ImageSet("NIH train (chest)", "chest_xray", "fit", [_decoded(p) for p in nih_fit])
    yield ImageSet("Kermany train (chest)", "chest_xray", "fit",
                   [_decoded(p) for p in _pick(kermany, 0.12, "gate", True)[:per_set]])
    yield ImageSet("JSRT train (chest)", "chest_xray", "fit",
                   [_decoded(p) for p in jsrt if split_of(p.stem) != "test"])
    brain = data / "brain-tumor-mri"
    fitted_brain = [p for c in ("glioma", "meningioma", "notumor") for p in sorted((brain / c).glob("*.jpg"))]
    yield ImageSet("brain MRI (3 classes, half)", "brain_mri", "fit", [_decoded(p) for p in _pick(fitted_brain, 0.5, "gate", True)])
    yield ImageSet("rotated chest films", "other", "fit", [_transformed(p, _rotate, i) for i, p in enumerate(nih_fit[:150])])
    yield ImageSet("chest film crops", "other", "fit", [_transformed(p, _crop, i) for i, p in enumerate(nih_fit[150:300])])
    yield ImageSet("text pages", "other", "fit", _drawn(_document, range(150)))
    yield ImageSet("noise textures", "other", "fit", _drawn(_texture, range(150)))
    yield from _evaluation_sets(data, fitted_brain, brain)


def _evaluation_sets(data: Path, fitted_brain: list[Path], brain: Path) -> Iterator[ImageSet]:
    for name, folder in (("NIH sample (chest)", "nih-cxr14-sample/images"),
                         ("NIH bbox set (chest)", "nih-cxr14-bbox/images"),
                         ("Kermany val (chest)", "kermany-pneumonia/val")):
        yield ImageSet(name, "chest_xray", "held-out", [_decoded(p) for p in _images(data / folder)])
    jsrt = sorted((data / "jsrt-scr-masks" / "images").glob("*.png"))
    from medai.training.segmentation import split_of

    yield ImageSet("JSRT test (chest)", "chest_xray", "held-out", [_decoded(p) for p in jsrt if split_of(p.stem) == "test"])
    dicoms = sorted((data / "dicom").glob("*.dcm"))
    yield ImageSet("shared chest DICOMs", "chest_xray", "held-out",
                   [_decoded(p) for p in dicoms if "RG3" not in p.name])
    yield ImageSet("brain MRI (3 classes, other half)", "brain_mri", "held-out",
                   [_decoded(p) for p in _pick(fitted_brain, 0.5, "gate", False)])
    yield ImageSet("brain MRI pituitary (class not fitted)", "brain_mri", "held-out kind",
                   [_decoded(p) for p in sorted((brain / "pituitary").glob("*.jpg"))])
    yield ImageSet("tibia radiograph (pixels only)", "other", "held-out kind",
                   [_decoded(p) for p in dicoms if "RG3" in p.name])
    nih_eval = _images(data / "nih-cxr14-sample" / "images")[:100]
    yield ImageSet("upside-down chest films (other films)", "other", "held-out",
                   [_transformed(p, lambda x, s: x[::-1].copy(), i) for i, p in enumerate(nih_eval)])
    yield ImageSet("photographs (crops)", "other", "held-out kind", _drawn(_photo, range(100)))
    yield ImageSet("geometric drawings", "other", "held-out kind", _drawn(_shapes, range(100)))


def fit(features: dict[str, np.ndarray], kinds: dict[str, str], components: int = 64, quantile: float = 0.995,
        seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Scaler, PCA, multinomial logistic regression and per-kind Mahalanobis limits. A fifth of each
    fitting set (by position) calibrates the limits instead of fitting them."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    from medai.gate import KINDS

    fit_x, fit_y, cal_x, cal_y = [], [], [], []
    for name, f in features.items():
        calib = np.arange(len(f)) % 5 == 4
        fit_x.append(f[~calib])
        cal_x.append(f[calib])
        fit_y += [KINDS.index(kinds[name])] * int((~calib).sum())
        cal_y += [KINDS.index(kinds[name])] * int(calib.sum())
    x, y, cx, cy = np.concatenate(fit_x), np.array(fit_y), np.concatenate(cal_x), np.array(cal_y)
    # ReLU6 features: many are zero on nearly every fitting image; a floor on the scale keeps one that
    # fires on a new image from dominating the projection
    mean, std = x.mean(axis=0), x.std(axis=0)
    scale = std + np.median(std)
    pca = PCA(components, random_state=seed).fit((x - mean) / scale)
    px, pcx = pca.transform((x - mean) / scale), pca.transform((cx - mean) / scale)
    lr = LogisticRegression(C=0.5, max_iter=3000, class_weight="balanced").fit(px, y)
    arrays = {"feature_mean": mean, "feature_scale": scale, "pca_mean": pca.mean_, "pca_components": pca.components_,
              "lr_coef": lr.coef_, "lr_intercept": lr.intercept_, "min_probability": np.array([0.5])}
    for k, kind in enumerate(KINDS[:2]):
        cov = LedoitWolf().fit(px[y == k])
        arrays[f"mean_{kind}"], arrays[f"precision_{kind}"] = cov.location_, cov.precision_
        d = cov.mahalanobis(pcx[cy == k]) ** 0.5
        arrays[f"limit_{kind}"] = np.array([float(np.quantile(d, quantile)) * 1.15])
    card = {"feature_extractor": "imagenet-efficientnet-lite0 pooled features, 224 px", "pca_components": components,
            "classifier": "multinomial logistic regression (C=0.5, balanced)",
            "distance_limit": f"{quantile:.1%} quantile of held-back fitting images of the kind, x 1.15",
            "fitted_on": {name: int(len(f)) for name, f in features.items()}}
    return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}, card  # write_tensors orders them


def features_of(image_set: ImageSet, batch: int = 32) -> np.ndarray:
    from medai.gate import feature_extractor

    extract = feature_extractor()
    out = []
    for i in range(0, len(image_set.loaders), batch):
        out.append(extract([load() for load in image_set.loaders[i:i + batch]]))
    return np.concatenate(out) if out else np.zeros((0, 1280))
