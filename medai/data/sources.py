"""Where the shared datasets come from and on what terms: what a model card says of its training data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medai.config import DataConfig

DATASETS: dict[str, dict[str, str]] = {
    "kermany-pneumonia": {
        "source": "Kermany et al. 2018, Guangzhou Women and Children's Medical Center: paediatric (age 1-5) "
                  "frontal chest X-rays, 224 px grayscale",
        "licence": "CC BY 4.0",
        "limitations": "Validated on paediatric patients from one hospital only: not on adults or other sites. "
                       "Bacterial and viral pneumonia are one class. The validation split comes from the same "
                       "distribution as Kermany's training films, so real-world performance will be lower."},
    "nih-cxr14-train-224": {
        "source": "NIH Clinical Center ChestX-ray14 (Wang et al. 2017), patients 1-3923, 224 px",
        "licence": "CC0",
        "limitations": "Labels were text-mined from reports (about 90% accurate) and several findings are "
                       "rare; one hospital, adults. Trained on about 13k of NIH's 112k images (patients "
                       "1-3923) at low resolution on CPU: small findings (nodules) are poorly detected."},
    "brain-tumor-mri": {
        "source": "Brain MRI slices assembled from figshare, SARTAJ and Br35H (Kaggle 'Brain Tumor MRI "
                  "Dataset'), duplicates removed",
        "licence": "research and testing only (mixed sources)",
        "limitations": "Mixed public sources with unknown scanners and sequences; single slices, not volumes; "
                       "research and testing only."},
}


def dataset_info(root: str) -> dict[str, str]:
    return DATASETS.get(Path(root).name, {"source": root, "licence": "unknown",
                                          "limitations": "No dataset notes recorded."})


def training_data_info(data: DataConfig) -> dict[str, Any]:
    """Source, licence and limitations of a run's training data: its set, and each set ``data.extra_train``
    added (``also``), whose films validation does not include."""
    info: dict[str, Any] = dict(dataset_info(data.root))
    if data.extra_train:
        info["also"] = [dataset_info(extra.root) for extra in data.extra_train]
        names = ", ".join(Path(e.root).name for e in data.extra_train)
        info["limitations"] += (f" Training also drew on films of {names} (see Training data); validation "
                                "does not include them, so how the model does on their kind of patients is not "
                                "measured here.")
    return info
