"""Datasets: NIH ChestX-ray14, folder (``<split>/<class>/*`` or ``<class>/*``), generic CSV and MedMNIST.

Every loader produces :class:`Record` objects; :class:`XrayDataset` turns them into samples of the same
shape, ``(image 1xSxS, target vector, id, patient id)``, whatever the source. When the layout has no
split, records are split by patient with a fixed seed so that no patient crosses splits.
"""

from __future__ import annotations

import csv
import logging
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medai.config import DataConfig
from medai.data.cache import DecodeCache
from medai.data.transforms import PreprocessSpec, augment_and_normalise, resize_to_uint8
from medai.errors import DatasetError
from medai.paths import resolve_data_path
from medai.tasks import NIH_FINDINGS, NO_FINDING, TaskKind

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Record:
    id: str
    source: str | tuple[str, str, int]  # a file path, or (npz path, array key, index)
    target: np.ndarray  # float32 vector over the labels (one-hot for multi-class)
    patient_id: str
    split: str | None = None


@dataclass
class RecordSet:
    labels: list[str]
    kind: TaskKind
    records: list[Record]
    root: str
    format: str
    notes: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]

    def summary(self) -> dict[str, Any]:
        """Counts per split and label, patients per split: what `data inspect` prints."""
        out: dict[str, Any] = {"root": self.root, "format": self.format, "kind": self.kind,
                               "labels": self.labels, "splits": {}, **self.notes}
        for split in sorted({r.split or "unsplit" for r in self.records}):
            recs = [r for r in self.records if (r.split or "unsplit") == split]
            counts = np.sum([r.target for r in recs], axis=0) if recs else np.zeros(len(self.labels))
            out["splits"][split] = {
                "images": len(recs), "patients": len({r.patient_id for r in recs}),
                "per_label": {lab: int(c) for lab, c in zip(self.labels, counts)},
            }
        return out


# ----------------------------------------------------------------------------------------------- loaders
def detect_format(root: Path) -> str:
    if root.is_file():
        if root.suffix == ".npz":
            return "npz"
        if root.suffix == ".csv":
            return "csv"
        raise DatasetError(f"{root}: a dataset file must be .npz (MedMNIST) or .csv (path,labels)")
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist (relative paths are taken under "
                           "MEDAI_DATA_DIR)")
    if list(root.glob("Data_Entry_2017*.csv")):
        return "nih"
    if list(root.glob("*.npz")):
        return "npz"
    if (root / "labels.csv").is_file():
        return "csv"
    return "folder"


def load_records(cfg: DataConfig, root: str | None = None) -> RecordSet:
    """Read the labelled records of a dataset and assign splits."""
    path = resolve_data_path(root or cfg.root)
    fmt = cfg.format if (cfg.format != "auto" and root is None) else detect_format(path)
    loader = {"nih": _load_nih, "folder": _load_folder, "csv": _load_csv, "npz": _load_npz}[fmt]
    recset = loader(path, cfg)
    if not recset.records:
        raise DatasetError(f"{path}: no labelled images found (format {fmt})")
    if cfg.labels:
        recset = _select_labels(recset, cfg.labels)
    if all(r.split is None for r in recset.records):
        assign_patient_splits(recset.records, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    return recset


def _select_labels(recset: RecordSet, wanted: list[str]) -> RecordSet:
    missing = [w for w in wanted if w not in recset.labels]
    if missing:
        raise DatasetError(f"labels {missing} are not in the dataset (it has {recset.labels})")
    idx = [recset.labels.index(w) for w in wanted]
    for r in recset.records:
        r.target = r.target[idx]
    if recset.kind == "multiclass":
        recset.records = [r for r in recset.records if r.target.sum() > 0]
    recset.labels = list(wanted)
    return recset


def _patient_of(stem: str, pattern: re.Pattern[str] | None) -> str:
    if pattern is None:
        return stem
    m = pattern.search(stem)
    return (m.group(1) if m.groups() else m.group(0)) if m else stem


def _compile(regex: str | None) -> re.Pattern[str] | None:
    if regex is None:
        return None
    try:
        return re.compile(regex)
    except re.error as exc:
        raise DatasetError(f"data.patient_regex {regex!r} is not a valid regular expression: {exc}") from None


def _find_csv(root: Path, cfg: DataConfig, pattern: str) -> Path:
    if cfg.csv:
        p = Path(cfg.csv)
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise DatasetError(f"label table {p} does not exist")
        return p
    found = sorted(root.glob(pattern))
    if not found:
        raise DatasetError(f"{root}: no label table matching {pattern}")
    return found[0]


def _image_dir(root: Path) -> Path:
    return root / "images" if (root / "images").is_dir() else root


def _load_nih(root: Path, cfg: DataConfig) -> RecordSet:
    table = _find_csv(root, cfg, "Data_Entry_2017*.csv")
    labels = list(NIH_FINDINGS) + ([NO_FINDING] if cfg.include_no_finding else [])
    images = _image_dir(root)
    present = {p.name for p in images.iterdir()}
    records, missing, unknown = [], 0, Counter()
    with open(table, newline="") as fh:
        for row in csv.DictReader(fh):
            name = row["Image Index"]
            if name not in present:
                missing += 1
                continue
            target = np.zeros(len(labels), dtype=np.float32)
            for finding in row["Finding Labels"].split("|"):
                if finding in labels:
                    target[labels.index(finding)] = 1.0
                elif finding != NO_FINDING:
                    unknown[finding] += 1
            records.append(Record(id=name, source=str(images / name), target=target,
                                  patient_id=str(row["Patient ID"])))
    if missing:
        log.warning("%s: %d rows of %s have no image file and were skipped", root, missing, table.name)
    notes: dict[str, Any] = {"rows_without_image": missing, "unknown_findings": dict(unknown)}
    official = root / "test_list.txt"
    if official.is_file():
        # NIH's own patient-disjoint test list: those images are the "test" split; train and val are drawn
        # by patient from the rest (train_val_list.txt), so published numbers stay comparable
        test_names = set(official.read_text().split())
        rest = [r for r in records if r.id not in test_names]
        for r in records:
            if r.id in test_names:
                r.split = "test"
        assign_patient_splits(rest, cfg.val_fraction, 0.0, cfg.split_seed)
        notes["official_test_list"] = len(records) - len(rest)
    return RecordSet(labels, "multilabel", records, str(root), "nih", notes=notes)


def _load_folder(root: Path, cfg: DataConfig) -> RecordSet:
    pattern = _compile(cfg.patient_regex)
    split_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower() in SPLIT_NAMES]
    groups = [(d.name.lower(), d) for d in split_dirs] if split_dirs else [(None, root)]
    class_names = sorted({c.name for _, g in groups for c in g.iterdir() if c.is_dir()})
    if not class_names:
        raise DatasetError(f"{root}: expected class folders (<class>/*.png or <split>/<class>/*.png)")
    records = []
    for split, group in groups:
        for ci, cname in enumerate(class_names):
            cdir = group / cname
            if not cdir.is_dir():
                continue
            for f in sorted(cdir.iterdir()):
                if f.suffix.lower() not in IMAGE_SUFFIXES or not f.is_file():
                    continue
                target = np.zeros(len(class_names), dtype=np.float32)
                target[ci] = 1.0
                records.append(Record(id=f"{split + '/' if split else ''}{cname}/{f.name}", source=str(f),
                                      target=target, patient_id=_patient_of(f.stem, pattern), split=split))
    return RecordSet(class_names, "multiclass", records, str(root), "folder")


def _load_csv(root: Path, cfg: DataConfig) -> RecordSet:
    table = root if root.is_file() else _find_csv(root, cfg, "labels.csv")
    base = table.parent
    pattern = _compile(cfg.patient_regex)
    rows = _read_table(table)
    if not rows or "path" not in rows[0] or "labels" not in rows[0]:
        raise DatasetError(f"{table}: a CSV dataset needs the columns 'path' and 'labels' "
                           "(labels joined by '|'); optional 'patient_id' and 'split'")
    for line, row in enumerate(rows, start=2):
        if not (row.get("path") or "").strip() or row.get("labels") is None or None in row:
            raise DatasetError(f"{table}, line {line}: every row needs a non-empty 'path' and a 'labels' cell "
                               "(and no more cells than the header has columns)")
        if "\0" in row["path"]:
            raise DatasetError(f"{table}, line {line}: the path holds a NUL character")
    per_row = [[s for s in r["labels"].split("|") if s] for r in rows]
    labels = sorted({lab for labs in per_row for lab in labs})
    kind: TaskKind = "multilabel" if any(len(labs) != 1 for labs in per_row) else "multiclass"
    records = []
    for row, labs in zip(rows, per_row):
        path = Path(row["path"])
        path = path if path.is_absolute() else base / path
        target = np.zeros(len(labels), dtype=np.float32)
        for lab in labs:
            target[labels.index(lab)] = 1.0
        split = (row.get("split") or "").strip().lower() or None
        patient = (row.get("patient_id") or "").strip() or _patient_of(path.stem, pattern)
        records.append(Record(id=row["path"], source=str(path), target=target, patient_id=patient,
                              split=split))
    return RecordSet(labels, kind, records, str(table), "csv")


def _read_table(table: Path) -> list[dict[str, str]]:
    """All rows of a UTF-8 CSV label table, or a DatasetError that says why it cannot be read."""
    try:
        with open(table, newline="", encoding="utf-8-sig") as fh:
            return list(csv.DictReader(fh))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{table}: not a UTF-8 text file (byte {exc.start}); save the label table as "
                           "UTF-8 CSV") from None
    except csv.Error as exc:
        raise DatasetError(f"{table}: not a readable CSV file ({exc})") from None
    except OSError as exc:
        raise DatasetError(f"{table}: cannot be read ({exc.strerror or exc})") from None


MAX_CLASSES = 1000


def _check_npz_labels(file: Path, split: str, arr: np.ndarray, multilabel: bool) -> None:
    """MedMNIST labels: (N,) or (N, 1) class indices, or (N, C) 0/1 flags; anything else is refused before
    it can size an array (a label of 2**40 would otherwise allocate terabytes)."""
    where = f"{file}: {split}_labels"
    if arr.size == 0 or arr.ndim not in (1, 2):
        raise DatasetError(f"{where} has shape {arr.shape}; expected (N,), (N, 1) or (N, classes) with N > 0")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
            or arr.dtype == np.bool_):
        raise DatasetError(f"{where} holds {arr.dtype} values; expected numbers")
    values = arr.astype(np.float64)
    if not np.isfinite(values).all() or (values != np.round(values)).any():
        raise DatasetError(f"{where} holds values that are not whole numbers (NaN, inf or fractions)")
    if multilabel and not np.isin(values, (0, 1)).all():
        raise DatasetError(f"{where}: a multi-label table must hold only 0 and 1")
    if not multilabel and (values.min() < 0 or values.max() >= MAX_CLASSES):
        raise DatasetError(f"{where}: class indices must be between 0 and {MAX_CLASSES - 1} "
                           f"(found {values.min():.0f} to {values.max():.0f})")
    if multilabel and arr.shape[1] > MAX_CLASSES:
        raise DatasetError(f"{where}: {arr.shape[1]} label columns is more than {MAX_CLASSES}")


def _load_npz(root: Path, cfg: DataConfig) -> RecordSet:
    found = [root] if root.is_file() else sorted(root.glob("*.npz"))
    if not found:
        raise DatasetError(f"{root}: no .npz file (MedMNIST format) in this folder")
    file = found[0]
    try:
        with np.load(file) as npz:  # allow_pickle stays False: an .npz cannot run code
            keys = set(npz.files)
            splits = [s for s in SPLIT_NAMES if f"{s}_images" in keys and f"{s}_labels" in keys]
            if not splits:
                raise DatasetError(f"{file}: expected MedMNIST keys like train_images / train_labels")
            label_arrays = {s: np.asarray(npz[f"{s}_labels"]) for s in splits}
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{file}: not a readable .npz archive ({exc})") from None
    first = label_arrays[splits[0]]
    multilabel = first.ndim == 2 and first.shape[1] > 1
    for s, arr in label_arrays.items():
        _check_npz_labels(file, s, arr, multilabel)
    n_classes = first.shape[1] if multilabel else int(max(a.max() for a in label_arrays.values())) + 1
    labels = cfg.labels if (cfg.labels and len(cfg.labels) == n_classes) else [
        f"class_{i}" for i in range(n_classes)]
    records = []
    for s in splits:
        for i, lab in enumerate(label_arrays[s]):
            if multilabel:
                target = lab.astype(np.float32)
            else:
                target = np.zeros(n_classes, dtype=np.float32)
                target[int(np.ravel(lab)[0])] = 1.0
            records.append(Record(id=f"{s}/{i}", source=(str(file), f"{s}_images", i), target=target,
                                  patient_id=f"{s}/{i}", split=s))
    return RecordSet(labels, "multilabel" if multilabel else "multiclass", records, str(file), "npz")


def cap_records(records: list[Record], limit: int | None, seed: int) -> list[Record]:
    """A seeded random subset of at most ``limit`` records, in their original order."""
    if limit is None or len(records) <= limit:
        return records
    idx = np.sort(np.random.default_rng(seed).choice(len(records), limit, replace=False))
    return [records[i] for i in idx]


def assign_patient_splits(records: list[Record], val_fraction: float, test_fraction: float,
                          seed: int) -> None:
    """Split by patient with a fixed seed: each patient's images all land in one split."""
    patients = sorted({r.patient_id for r in records})
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(patients))
    n_val = int(round(len(patients) * val_fraction))
    n_test = int(round(len(patients) * test_fraction))
    split_of = {}
    for rank, idx in enumerate(order):
        split_of[patients[idx]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    for r in records:
        r.split = split_of[r.patient_id]


# ----------------------------------------------------------------------------------------------- dataset
class XrayDataset(Dataset):
    """Records -> ``(image 1xSxS float32, target, id, patient_id)``, decoding through the disk cache.

    With ``masks`` (a callable from a record's source to a uint8 SxS mask, e.g.
    :class:`medai.training.attention.ChestMasks`) each sample gets a fifth item: that mask as float 1xSxS,
    augmented together with the image."""

    def __init__(self, records: list[Record], spec: PreprocessSpec, cache: DecodeCache | None = None,
                 augment: Any = None, masks: Any = None):
        self.records = records
        self.spec = spec
        self.cache = cache
        self.augment = augment
        self.masks = masks
        self._arrays: dict[tuple[str, str], np.ndarray] = {}  # MedMNIST arrays, read once

    def __len__(self) -> int:
        return len(self.records)

    def load_uint8(self, rec: Record) -> np.ndarray:
        if isinstance(rec.source, tuple):
            file, key, idx = rec.source
            if (file, key) not in self._arrays:  # npz[key] reads the whole array on every access
                with np.load(file) as npz:
                    self._arrays[(file, key)] = npz[key]
            arr = np.asarray(self._arrays[(file, key)][idx], dtype=np.float32)
            if arr.max() > 1.0:
                arr = arr / 255.0
            return resize_to_uint8(arr, self.spec.image_size)
        if self.cache is not None:
            return self.cache.load(rec.source, self.spec.image_size)
        from medai.data.io import decode_image

        return resize_to_uint8(decode_image(rec.source).pixels, self.spec.image_size)

    def __getitem__(self, index: int) -> tuple:
        rec = self.records[index]
        mask = None if self.masks is None else self.masks(rec.source)
        image, mask_t = augment_and_normalise(self.load_uint8(rec), self.spec, self.augment, mask)
        sample = (image, torch.from_numpy(rec.target), rec.id, rec.patient_id)
        if self.masks is None:
            return sample
        if mask_t is None:  # no segmentation: all inside, so the attention term leaves this film out
            mask_t = torch.ones((1, *image.shape[-2:]), dtype=torch.float32)
        return (*sample, mask_t)
