"""Label sets and task kinds."""

from __future__ import annotations

from typing import Literal

TaskKind = Literal["multilabel", "multiclass"]

# The 14 ChestX-ray14 findings, spelled and ordered as NIH publishes them.
NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"

