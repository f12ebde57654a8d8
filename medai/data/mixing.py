"""More training films from other labelled sets (``data.extra_train``), mapped onto the task's labels.

A model trained on one hospital's films can learn that hospital's cues instead of the finding (Kermany's
paediatric films: borders, side markers, collimation). Films of the same classes from another site take the
signal out of those cues. Only the training split grows: validation stays the main set's, so AUROC and
calibration stay comparable with a model trained on the main set alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medai.config import DataConfig, ExtraTrainConfig
from medai.data.datasets import Record, RecordSet, cap_records, load_records
from medai.errors import DatasetError


def extra_train_records(data: DataConfig, recset: RecordSet) -> list[Record]:
    """The films every ``data.extra_train`` entry adds to training, relabelled onto ``recset.labels``.

    What each entry contributed (films per task label) is recorded in ``recset.notes['extra_train']``, which
    the run's card carries."""
    added: list[Record] = []
    notes = []
    for index, extra in enumerate(data.extra_train):
        records = _mapped(extra, recset, f"data.extra_train[{index}]")
        added += records
        per = np.sum([r.target for r in records], axis=0) if records else np.zeros(len(recset.labels))
        notes.append({"root": extra.root, "split": extra.split, "images": len(records),
                      "patients": len({r.patient_id for r in records}),
                      "per_label": {lab: int(c) for lab, c in zip(recset.labels, per)},
                      "labels_from": {k: list(v) for k, v in extra.labels.items()}})
    if notes:
        recset.notes["extra_train"] = notes
    return added


def _mapped(extra: ExtraTrainConfig, recset: RecordSet, key: str) -> list[Record]:
    unknown = sorted(set(extra.labels) - set(recset.labels))
    if unknown:
        raise DatasetError(f"{key}.labels: {unknown} are not labels of this task (it has {recset.labels})")
    # the source's own default split (its patient split, NIH's test list), so that its validation films stay
    # unseen when the same set trains or evaluates another model
    source = load_records(DataConfig(root=extra.root, include_no_finding=True, patient_regex=extra.patient_regex))
    for wanted in extra.labels.values():
        missing = [w for w in wanted if w not in source.labels]
        if missing:
            raise DatasetError(f"{key}.labels: {missing} are not labels of {extra.root} (it has {source.labels})")
    pool = [r for r in source.records if extra.split == "all" or r.split == extra.split]
    if not pool:
        raise DatasetError(f"{key}: {extra.root} has no films in split '{extra.split}'")
    groups: dict[str, list[Record]] = {lab: [] for lab in extra.labels}
    for rec in pool:
        present = {source.labels[i] for i in np.flatnonzero(rec.target)}
        matched = [lab for lab, wanted in extra.labels.items() if present & set(wanted)]
        if len(matched) != 1 and recset.kind == "multiclass":
            continue  # no class of this task, or more than one: not a film of exactly one class
        if matched:
            groups[matched[0]].append(_relabelled(rec, matched, recset.labels, Path(extra.root).name))
    out: list[Record] = []
    for records in groups.values():
        out += cap_records(records, extra.per_label, extra.seed)
    return out


def _relabelled(rec: Record, matched: list[str], labels: list[str], set_name: str) -> Record:
    target = np.zeros(len(labels), dtype=np.float32)
    target[[labels.index(lab) for lab in matched]] = 1.0
    # a set's patient numbers can repeat another set's: the set's name keeps patients apart
    return Record(id=f"{set_name}/{rec.id}", source=rec.source, target=target,
                  patient_id=f"{set_name}:{rec.patient_id}", split="train")


def label_sources(labels: dict[str, list[str]], counts: dict[str, int] | None = None) -> str:
    """``labels`` (task label -> the other set's labels) in words, with the films of each when ``counts``."""
    return ", ".join(f"{lab}{'' if counts is None else ' ' + str(counts.get(lab, 0))} from {' or '.join(src)}"
                     for lab, src in labels.items())


def describe_extra_train(notes: list[dict[str, Any]]) -> list[str]:
    """One line per added set for a model card: how many films of which label came from where."""
    return [f"{n['images']} films of {Path(n['root']).name} ({n['split']} split): "
            + label_sources(n["labels_from"], n["per_label"]) for n in notes]
