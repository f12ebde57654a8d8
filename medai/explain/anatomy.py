"""Anatomical regions of a frontal chest X-ray by classical image processing, CTR and attention shares.

No anatomy masks exist here to train on, so the regions come from well-understood steps:

1. normalise (2nd-98th percentile), smooth, Otsu threshold on the central region: air-filled lung is
   darker than soft tissue and bone;
2. row by row, dark runs that reach the image edge are outside air; enclosed dark runs are lung
   candidates (per-row runs do not leak into outside air through the trachea or the axillae);
3. the remaining dark components, filled and closed, are lung candidates; the largest one on each side
   of the image midline is a lung field (a single component spanning the midline is split at the spine,
   the brightest column near the centre); shape priors (area, height, vertical overlap) reject failures;
4. between the lungs, rows in the lower half of the lung span form the cardiac silhouette, rows above it
   the upper mediastinum; everything else inside the body is "rest of body".

The cardiothoracic ratio is the widest gap between the medial lung edges (rows at 50-80% of the lung
span) over the widest distance between the lateral lung edges (Danzer's method on lung masks),
averaged over the segmentations at several thresholds that pass the shape priors.

Known failures: lungs cut by tight collimation or touching the border; large effusions or consolidation
that make a lung bright (the lung field is under-segmented and the CTR unreliable); AP and supine films
(magnified heart); rotated patients; lateral views and non-chest images, which are reported as not
applicable rather than given invented masks. Before segmenting, images framed in black on all sides
(cross-sectional slices such as brain MRI) are refused; a chest film scanned with a wide black margin
all round is refused too (crop it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage as ndi
from torch.nn import functional as F

from medai.explain.masks import fill_holes, largest_component
from medai.imaging import resize_float

WORK_SIZE = 256
CTR_REFERENCE_PA = 0.5
# Rows (as fractions of the lung span, apex = 0) searched for the widest cardiac gap. The lung bases
# are left out: the medial edges diverge there (cardiophrenic angles), inflating normal hearts. The
# window was chosen on 447 PA images of nih-cxr14-train-224 (CTR AUROC 0.771 there, Cardiomegaly vs
# No Finding), not on the evaluation sample.
CARDIAC_ROWS = (0.5, 0.8)
MIN_LUNG_HEIGHT = 0.3  # shape priors that separate lung fields from dark regions of other images
MIN_LUNG_ASPECT = 1.0  # lung fields are taller than wide on a frontal film
MIN_THORAX_WIDTH = 0.45
MIN_MEDIASTINAL_CONTRAST = 0.15  # mediastinum/heart minus lung mean intensity (normalised image)
MIN_MEDIASTINUM = 0.06  # median gap between the lung fields, as a share of the image width
EDGE_MARGIN = 0.04
# Otsu threshold multipliers tried. The masks come from the plausible segmentation closest to 1.0; the
# CTR is the mean over all plausible ones, which halves single-threshold noise (on 443 PA images of
# nih-cxr14-train-224: CTR AUROC 0.815 with the mean vs 0.66-0.77 from one threshold).
THRESHOLD_FACTORS = (0.7, 0.85, 1.0, 1.15, 1.3)
# Real lung fields usually pass the priors at several thresholds, chance shapes rarely. Requiring 2 cut
# brain-MRI false acceptance from 23.9% to 6.5% but lost NIH PA lung fields (97.3% -> 93.8%) and
# paediatric chests (85% -> 63%); so 1 is required and a single agreeing threshold is reported as low
# confidence instead.
MIN_AGREEING_THRESHOLDS = 1  # dark runs starting this close to the left/right edge are outside air
# Cross-sectional slices (brain MRI, CT) are an object floating in black on all four sides; a chest film
# has the body reaching at least the bottom edge and usually the sides. An image whose outer ring (3% of
# the side) is at least this dark (below 10% of the intensity range) is refused before segmentation.
# Chosen on nih-cxr14-train-224 (no chest image lost anywhere from 0.65 to 0.8) and the glioma and
# meningioma MRI folders; benchmarks/anatomy.py reports it on the NIH sample and the other MRI folders.
MAX_DARK_FRAME = 0.7
FRAME = 0.03


@dataclass
class ChestAnatomy:
    applicable: bool
    reason: str = ""
    right_lung: np.ndarray | None = None  # patient's right lung = image left on a PA film
    left_lung: np.ndarray | None = None
    heart: np.ndarray | None = None
    mediastinum: np.ndarray | None = None
    body: np.ndarray | None = None
    ctr: float | None = None
    ctr_detail: dict = field(default_factory=dict)

    def regions(self) -> dict[str, np.ndarray]:
        """Disjoint boolean masks at WORK_SIZE covering the whole image (where a learned heart mask
        overlaps a lung at its border, the pixel counts as lung)."""
        assert self.applicable
        lungs_heart = self.right_lung | self.left_lung | self.heart
        heart = self.heart & ~(self.right_lung | self.left_lung)
        return {"right_lung": self.right_lung, "left_lung": self.left_lung, "heart": heart,
                "rest_of_body": self.body & ~lungs_heart, "outside_body": ~self.body & ~lungs_heart}


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=256, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centers) - np.cumsum(hist * centers)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centers[int(np.argmax(between))])


def _prepare(pixels: np.ndarray) -> np.ndarray:
    x = resize_float(pixels, (WORK_SIZE, WORK_SIZE))
    lo, hi = np.percentile(x, [2, 98])
    x = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)
    return ndi.gaussian_filter(x, 2.0)


def dark_frame_share(x: np.ndarray) -> float:
    """Share of the outer ring of a prepared image that is background-dark."""
    m = max(2, int(FRAME * x.shape[0]))
    lo, hi = np.percentile(x, [2, 98])
    ring = np.concatenate([x[:m].ravel(), x[-m:].ravel(), x[:, :m].ravel(), x[:, -m:].ravel()])
    return float((ring < lo + 0.1 * (hi - lo)).mean())


def _central_threshold(x: np.ndarray) -> float:
    """Otsu on the central region, where lungs meet soft tissue and bone (outside air is excluded)."""
    h, w = x.shape
    return _otsu(x[int(h * 0.2): int(h * 0.8), int(w * 0.15): int(w * 0.85)].ravel())


def _opening(mask: np.ndarray, size: int) -> np.ndarray:
    """``ndi.binary_opening`` with a size x size square (zero border), as separable min/max filters."""
    return ndi.maximum_filter(ndi.minimum_filter(mask, size, mode="constant", cval=0), size, mode="constant", cval=0)


def _closing(mask: np.ndarray, size: int) -> np.ndarray:
    """``ndi.binary_closing`` with a size x size square (zero border): a 7x7 square twice is 13 x 13."""
    return ndi.minimum_filter(ndi.maximum_filter(mask, size, mode="constant", cval=0), size, mode="constant", cval=0)


def _runs_from_left(dark: np.ndarray, margin: int) -> np.ndarray:
    """Per row, the dark run that starts within ``margin`` columns of the left edge, from the edge on."""
    cols = np.arange(dark.shape[1])
    near = dark[:, :margin]
    starts = np.argmax(near, axis=1)
    after = ~dark & (cols >= starts[:, None])
    ends = np.where(after.any(1), np.argmax(after, axis=1), dark.shape[1])
    return near.any(1)[:, None] & (cols < ends[:, None])


def _lung_candidates(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(lung candidate mask, outside-body mask) for one threshold.

    Row by row, a dark run that reaches the row's first or last column is outside air; dark runs
    enclosed by brighter tissue are lung candidates. Working per row stops the 2-D leaks from the
    lungs to outside air through the trachea or the axillae."""
    dark = x < threshold
    margin = int(dark.shape[1] * EDGE_MARGIN)  # a thin bright strip at the edge (collimator, label) is not tissue
    outside = _runs_from_left(dark, margin) | _runs_from_left(dark[:, ::-1], margin)[:, ::-1]
    return _opening(dark & ~outside, 3), outside


def _drop_border_components(inner: np.ndarray) -> np.ndarray:
    """Remove candidates that touch the image border: air beside the neck, collimator gaps."""
    labels, _ = ndi.label(inner)
    border = np.unique(np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(),
                                       labels[:, -2:].ravel()]))
    return inner & ~np.isin(labels, border[border > 0])


def _split_at_spine(mask: np.ndarray, x: np.ndarray) -> np.ndarray:
    w = mask.shape[1]
    centre = slice(int(w * 0.4), int(w * 0.6))
    spine = int(np.argmax(x[:, centre].mean(0))) + centre.start
    out = mask.copy()
    out[:, max(spine - 2, 0): spine + 3] = False
    return out


def _pick_lungs(inner: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    h, w = inner.shape
    labels, n = ndi.label(inner)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    big = [i + 1 for i in np.argsort(sizes)[::-1] if sizes[i] > 0.01 * h * w]
    if len(big) == 1:  # one component spanning both sides: cut at the spine and try again
        split = _split_at_spine(labels == big[0], x)
        labels, n = ndi.label(split)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        big = [i + 1 for i in np.argsort(sizes)[::-1] if sizes[i] > 0.01 * h * w]
    sides: dict[str, np.ndarray] = {}
    for lab in big:
        comp = labels == lab
        side = "right" if ndi.center_of_mass(comp)[1] < w / 2 else "left"
        if side not in sides:
            sides[side] = comp
    if len(sides) < 2:
        return None
    cleaned = []
    for side in ("right", "left"):
        cleaned.append(largest_component(fill_holes(_closing(sides[side], 13))))
    return cleaned[0], cleaned[1]


def _row_extent(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last True column of each row (meaningful only for rows with any True)."""
    w = mask.shape[1]
    return np.argmax(mask, axis=1), w - 1 - np.argmax(mask[:, ::-1], axis=1)


def _plausible(right: np.ndarray, left: np.ndarray) -> str:
    h, w = right.shape
    for name, m in (("right", right), ("left", left)):
        share = m.mean()
        rows = np.flatnonzero(m.any(1))
        if not 0.03 <= share <= 0.35:
            return f"{name} lung field covers {share:.0%} of the image"
        cols = np.flatnonzero(m.any(0))
        if rows[-1] - rows[0] < MIN_LUNG_HEIGHT * h:
            return f"{name} lung field is only {(rows[-1] - rows[0]) / h:.0%} of the image height"
        if rows[-1] - rows[0] < MIN_LUNG_ASPECT * (cols[-1] - cols[0]):
            return f"{name} lung field is wider than it is tall"
    r_rows, l_rows = np.flatnonzero(right.any(1)), np.flatnonzero(left.any(1))
    overlap = min(r_rows[-1], l_rows[-1]) - max(r_rows[0], l_rows[0])
    if overlap < 0.5 * min(r_rows[-1] - r_rows[0], l_rows[-1] - l_rows[0]):
        return "the two lung fields are not side by side"
    if np.flatnonzero(right.any(0))[-1] >= np.flatnonzero(left.any(0))[0] + 5:
        return "the lung fields overlap horizontally"
    shared = np.flatnonzero(right.any(1) & left.any(1))
    gaps = _row_extent(left)[0][shared] - _row_extent(right)[1][shared]
    if np.median(gaps) < MIN_MEDIASTINUM * w:
        return "no mediastinum between the two dark regions"
    thorax = np.flatnonzero(left.any(0))[-1] - np.flatnonzero(right.any(0))[0]
    if thorax < MIN_THORAX_WIDTH * w:
        return f"the lung fields span only {thorax / w:.0%} of the image width"
    return ""


def _between_lungs(right: np.ndarray, left: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    h, w = right.shape
    rows = np.flatnonzero(right.any(1) & left.any(1))
    top, bottom = rows[0], rows[-1]
    mid = top + (bottom - top) // 2
    (r_out, r_in), (l_in, l_out) = (e[rows] for e in _row_extent(right)), (e[rows] for e in _row_extent(left))
    widths = l_out - r_out
    cols = np.arange(w)
    gap_rows = l_in > r_in
    between = np.zeros_like(right)
    between[rows] = gap_rows[:, None] & (cols > r_in[:, None]) & (cols < l_in[:, None])
    heart, mediastinum = between.copy(), between
    heart[:mid], mediastinum[mid:] = False, False
    ctr_rows = (top + CARDIAC_ROWS[0] * (bottom - top), top + CARDIAC_ROWS[1] * (bottom - top))
    gaps = (l_in - r_in)[gap_rows & (rows >= ctr_rows[0]) & (rows <= ctr_rows[1])]
    detail = {"thoracic_width_px": int(widths.max()), "cardiac_width_px": int(gaps.max()) if gaps.size else None,
              "lung_rows": [int(top), int(bottom)], "work_size": WORK_SIZE}
    return heart, mediastinum, detail


def segment_chest(pixels: np.ndarray, body_part: str | None = None, view: str | None = None,
                  modality: str | None = None, method: str = "auto") -> ChestAnatomy:
    """Lung fields, heart, mediastinum and body of a frontal chest X-ray (masks at WORK_SIZE). ``method``:
    ``learned`` (the shipped segmenter, ``segmentation.py``), ``classical`` (below), or ``auto``: learned
    when its weights are installed."""
    from medai.gate import tag_reason

    why = tag_reason("chest_xray", modality, body_part, view)
    if why:
        return ChestAnatomy(False, f"anatomy maps apply to frontal chest radiographs; {why}")
    x = _prepare(pixels)
    frame = dark_frame_share(x)
    if frame >= MAX_DARK_FRAME:
        return ChestAnatomy(False, f"the image is surrounded by dark background ({frame:.0%} of its border), like "
                            "a cross-sectional slice (MRI/CT), not a chest X-ray, so no anatomy map is given")
    if method != "classical":
        from medai.explain import segmentation

        learned = segmentation.segmenter()
        if learned is not None:
            return segmentation.to_anatomy(learned.segment(pixels), x)
        if method == "learned":
            raise FileNotFoundError(f"no learned segmenter at {segmentation.default_path()}")
    return _classical(x)


def _classical(x: np.ndarray) -> ChestAnatomy:
    base = _central_threshold(x)
    reason = "lung fields not found"
    for drop_border in (True, False):
        found = []  # (preference, masks, detail) for every plausible segmentation
        for rank, factor in enumerate(THRESHOLD_FACTORS):
            inner, outside = _lung_candidates(x, base * factor)
            lungs = _pick_lungs(_drop_border_components(inner) if drop_border else inner, x)
            if lungs is None:
                continue
            reason = _plausible(*lungs)
            if reason:
                continue
            right, left = lungs
            heart, mediastinum, detail = _between_lungs(right, left)
            between = heart | mediastinum
            contrast = float(x[between].mean() - x[right | left].mean()) if between.any() else 0.0
            if contrast < MIN_MEDIASTINAL_CONTRAST:
                reason = "the region between the dark fields is not brighter than them (no mediastinum)"
                continue
            body = fill_holes(~outside) | right | left
            found.append((abs(factor - 1.0), rank, (right, left, heart, mediastinum, largest_component(body)), detail))
        if len(found) >= MIN_AGREEING_THRESHOLDS:
            _, _, masks, detail = min(found, key=lambda item: item[:2])
            ratios = [d["cardiac_width_px"] / d["thoracic_width_px"] for *_, d in found if d["cardiac_width_px"]]
            detail = {**detail, "thresholds_agreeing": len(found),
                      "confidence": "low" if len(found) == 1 else "normal",
                      "ctr_spread": float(np.ptp(ratios)) if ratios else None}
            return ChestAnatomy(True, "", *masks, float(np.mean(ratios)) if ratios else None, detail)
    return ChestAnatomy(False, f"{reason}: this does not look like a frontal chest X-ray, so no anatomy map "
                        "is given")


def attention_shares(heatmap: np.ndarray, anatomy: ChestAnatomy) -> dict[str, float]:
    """Share of the heatmap's total mass in each region (sums to 1)."""
    return attention_shares_of({"": heatmap}, anatomy)[""]


def attention_shares_of(heatmaps: dict[str, np.ndarray], anatomy: ChestAnatomy) -> dict[str, dict[str, float]]:
    """:func:`attention_shares` of each of one film's heatmaps (all of one size), resized to WORK_SIZE together
    (bilinear, antialiased when shrinking) and summed per region in one product."""
    regions = anatomy.regions()
    stack = torch.from_numpy(np.stack(list(heatmaps.values())).astype(np.float32))[:, None]
    heat = F.interpolate(stack, size=(WORK_SIZE, WORK_SIZE), mode="bilinear", align_corners=False, antialias=True)
    heat = heat.flatten(1).clamp_(min=0).double()
    masks = torch.from_numpy(np.stack([m.ravel() for m in regions.values()])).double()
    mass, total = (heat @ masks.T).numpy(), heat.sum(dim=1).numpy()
    return {label: {name: float(m / t) if t > 0 else 0.0 for name, m in zip(regions, row)}
            for label, row, t in zip(heatmaps, mass, total)}


def shortcut_warning(shares: dict[str, float], threshold: float = 0.5) -> str | None:
    if sum(shares.values()) <= 0:  # an empty heatmap shows no attention anywhere, so no shortcut either
        return None
    inside = shares.get("right_lung", 0) + shares.get("left_lung", 0) + shares.get("heart", 0)
    if inside < threshold:
        return (f"only {inside:.0%} of the attention falls on the lungs and heart; the model may be using "
                "shortcuts (borders, markers, devices) rather than anatomy")
    return None


def ctr_summary(anatomy: ChestAnatomy, view: str | None) -> dict:
    """The CTR with what qualifies it. ``reliable`` is False when the segmentation's confidence is low:
    the number is kept (with its caveat) but is not to be shown or filed as a measurement."""
    if not anatomy.applicable or anatomy.ctr is None:
        return {"ctr": None, "reliable": False, "note": anatomy.reason or "cardiac borders not found"}
    note = f"reference: CTR > {CTR_REFERENCE_PA} suggests cardiomegaly on a PA film"
    if view and view.upper() == "AP":
        note += "; this is an AP view, which magnifies the heart, so the CTR overestimates its size"
    reliable = anatomy.ctr_detail.get("confidence") != "low"
    caveat = "" if reliable else ("segmentation confidence is low (" + (", ".join(anatomy.ctr_detail.get("problems") or [])
                                  or "uncertain lung or heart borders") + "): not a reliable measurement")
    return {"ctr": round(float(anatomy.ctr), 3), "enlarged": bool(anatomy.ctr > CTR_REFERENCE_PA),
            "reliable": reliable, "caveat": caveat, "note": note, **anatomy.ctr_detail}


