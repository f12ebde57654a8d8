"""``data.extra_train``: another set's films added to training only, relabelled onto the task's labels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medai.config import DataConfig, ExtraTrainConfig, load_config
from medai.data.datasets import load_records
from medai.data.mixing import extra_train_records
from medai.errors import DatasetError, MedaiError
from medai.models.checkpoint import read_card
from medai.shipping import attach_baseline, ship_run
from medai.training.trainer import train
from tests.conftest import ROOT, need, tiny_config

NIH = "nih-cxr14-train-224"


def test_the_adult_films_of_the_pneumonia_recipe_are_nih_training_films_of_those_findings():
    need("kermany-pneumonia")
    need(NIH)
    cfg = load_config(ROOT / "configs/hybrid_pneumonia_nih_adults.yaml")
    main = load_records(cfg.data)
    added = extra_train_records(cfg.data, main)
    assert len(added) == 2 * 506 and {r.split for r in added} == {"train"}
    nih = load_records(DataConfig(root=NIH))
    table = (need(NIH) / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    rows = {r["Image Index"]: r for r in csv.DictReader(table)}
    nih_split = {r.id: r.split for r in nih.records}
    for rec in added:
        name = rec.id.removeprefix(f"{NIH}/")
        findings = set(rows[name]["Finding Labels"].split("|"))
        label = main.labels[int(np.argmax(rec.target))]
        assert (findings & {"Pneumonia", "Consolidation"}) if label == "PNEUMONIA" else findings == {"No Finding"}
        assert nih_split[name] == "train"  # NIH's validation films stay unseen
        assert rec.patient_id == f"{NIH}:{rows[name]['Patient ID']}"
    # every positive film of NIH's training split, the same number of normal films; the draw is seeded
    positives = [r for r in nih.records if r.split == "train" and r.target[[nih.labels.index("Pneumonia"),
                                                                             nih.labels.index("Consolidation")]].any()]
    assert len(positives) == 506
    assert [r.id for r in extra_train_records(cfg.data, load_records(cfg.data))] == [r.id for r in added]
    assert main.notes["extra_train"][0]["per_label"] == {"NORMAL": 506, "PNEUMONIA": 506}
    # the main set's validation is untouched
    assert len(main.split("val")) == 595 and not any(r.id.startswith(NIH) for r in main.split("val"))


def _made_set(tmp_path: Path) -> Path:
    """A CSV set of 12 films the test draws, labelled a, b, a|b and c in turn: 8 in train, 4 in val."""
    rows = ["path,labels,patient_id,split"]
    for i, labels in enumerate(["a", "b", "a|b", "c"] * 3):
        Image.fromarray(np.full((32, 32), 20 * i, np.uint8)).save(tmp_path / f"f{i}.png")
        rows.append(f"f{i}.png,{labels},p{i},{'train' if i < 8 else 'val'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def _task(tmp_path: Path, kind: str) -> DataConfig:
    main = tmp_path / "main"
    main.mkdir()
    rows = ["path,labels,split"]
    for i in range(4):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(main / f"m{i}.png")
        label = "X|Y" if kind == "multilabel" and i == 0 else "XY"[i % 2]
        rows.append(f"m{i}.png,{label},{'train' if i < 2 else 'val'}")
    (main / "labels.csv").write_text("\n".join(rows) + "\n")
    return DataConfig(root=str(main))


def test_a_film_of_two_classes_is_left_out_of_a_multiclass_task_and_kept_by_a_multilabel_one(tmp_path: Path):
    other = _made_set(tmp_path)
    for kind, expected in (("multiclass", {"X": 2, "Y": 2}), ("multilabel", {"X": 4, "Y": 4})):
        (tmp_path / kind).mkdir()
        data = _task(tmp_path / kind, kind)
        data.extra_train = [ExtraTrainConfig(root=str(other), labels={"X": ["a"], "Y": ["b"]})]
        main = load_records(data)
        assert main.kind == kind
        added = extra_train_records(data, main)
        per = dict(zip(main.labels, np.sum([r.target for r in added], axis=0).astype(int).tolist()))
        assert per == expected  # of the 8 training films: a twice, b twice, a|b twice, c never
        assert all(Path(r.source).parent == other for r in added)
    data.extra_train = [ExtraTrainConfig(root=str(other), labels={"X": ["a"], "Y": ["b"]}, split="all",
                                         per_label=1, seed=3)]
    assert len(extra_train_records(data, load_records(data))) == 2  # at most one film per label


@pytest.mark.parametrize("labels, split, message", [
    ({"Z": ["a"]}, "train", r"\['Z'\] are not labels of this task"),
    ({"X": ["a", "nope"]}, "train", r"\['nope'\] are not labels of"),
    ({"X": ["a"]}, "test", "has no films in split 'test'"),
])
def test_a_mapping_that_does_not_fit_names_what_is_wrong(tmp_path: Path, labels, split, message):
    other = _made_set(tmp_path)
    data = _task(tmp_path, "multiclass")
    data.extra_train = [ExtraTrainConfig(root=str(other), labels=labels, split=split)]
    with pytest.raises(DatasetError, match=message):
        extra_train_records(data, load_records(data))


def test_a_run_with_extra_films_trains_on_them_and_its_card_says_where_they_came_from(tmp_path: Path):
    need("pneumoniamnist")
    need("kermany-pneumonia")
    extra = {"root": "kermany-pneumonia", "labels": {"normal": ["NORMAL"], "pneumonia": ["PNEUMONIA"]},
             "per_label": 8}
    config = tiny_config(tmp_path, "pneumoniamnist", data={"labels": ["normal", "pneumonia"], "extra_train": [extra]},
                         train={"epochs": 1, "max_steps_per_epoch": 2, "bootstrap": 0})
    run_dir = train(load_config(config))
    summary = read_card(run_dir / "best.safetensors")["data_summary"]
    main_train = len(load_records(load_config(config).data).split("train"))
    assert summary["used"]["train"]["images"] == main_train + 16
    assert summary["extra_train"][0]["per_label"] == {"normal": 8, "pneumonia": 8}
    shipped = ship_run(run_dir, "mixed", out_dir=tmp_path / "models", n_boot=0)
    md = shipped.with_suffix(".md").read_text()
    assert "- Training also drew on: Kermany et al. 2018" in md and "(licence: CC BY 4.0)" in md
    assert ("of these, 16 films of kermany-pneumonia (train split): normal 8 from NORMAL, pneumonia 8 from PNEUMONIA"
            in md)
    assert "Training also drew on films of kermany-pneumonia (see Training data); validation does not include" in md
    # a model trained without the added films is not a baseline of the same data
    plain = tiny_config(tmp_path, "pneumoniamnist", data={"labels": ["normal", "pneumonia"]},
                        train={"epochs": 1, "max_steps_per_epoch": 2, "bootstrap": 0})
    base = ship_run(train(load_config(plain)), "plain", out_dir=tmp_path / "scratch", n_boot=0)
    with pytest.raises(MedaiError, match="on pneumoniamnist, this model on pneumoniamnist [+] kermany-pneumonia"):
        attach_baseline(shipped, base)
