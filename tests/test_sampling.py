"""Patient-balanced sampling (train.patient_balance) on the real NIH training split's patients, and in a run."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from medai.config import load_config
from medai.data.datasets import load_records
from medai.errors import ConfigError
from medai.runs import TRAIN_LOG, new_run
from medai.training.sampling import PatientBalancedSampler, effective_films, film_weights
from medai.training.trainer import Trainer
from tests.conftest import ROOT, need, tiny_config


@pytest.fixture(scope="module")
def nih_patients() -> list[str]:
    need("nih-cxr14-train-224")
    cfg = load_config(ROOT / "configs" / "efficientnet_lite0_nih14_ema.yaml")
    return [r.patient_id for r in load_records(cfg.data).split("train")]


def draws_per_patient(patients: list[str], power: float, epochs: int) -> dict[str, int]:
    sampler = PatientBalancedSampler(patients, power, seed=0)
    drawn: Counter[str] = Counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        drawn.update(patients[i] for i in sampler)
    return drawn


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_a_patients_share_of_the_draws_follows_the_power(nih_patients, power):
    """Per patient, an epoch's draws grow as n ** (1 - power) with the patient's film count n: as n at 0 (every
    film equally), as sqrt(n) at 0.5, not at all at 1 (every patient equally)."""
    films = Counter(nih_patients)
    drawn = draws_per_patient(nih_patients, power, epochs=10)
    single = np.mean([drawn[p] for p, n in films.items() if n == 1])
    many = [p for p, n in films.items() if n >= 20]
    assert len(many) > 50, len(many)
    ratio = np.mean([drawn[p] / films[p] ** (1 - power) for p in many]) / single
    assert ratio == pytest.approx(1.0, rel=0.1)
    assert sum(drawn.values()) == 10 * len(nih_patients)  # an epoch draws as many films as the split holds


def test_effective_size_and_weights(nih_patients):
    uniform, per_patient = film_weights(nih_patients, 0.0), film_weights(nih_patients, 1.0)
    assert float(uniform.sum()) == pytest.approx(1.0) and float(per_patient.sum()) == pytest.approx(1.0)
    assert effective_films(uniform) == pytest.approx(len(nih_patients))
    # every patient equally: a patient's n films share one patient's weight, so the effective size is
    # P ** 2 / sum(1 / n) over the P patients, between the number of patients and the number of films
    films = Counter(nih_patients)
    expected = len(films) ** 2 / sum(1 / n for n in films.values())
    assert effective_films(per_patient) == pytest.approx(expected)
    assert len(films) < expected < 0.5 * len(nih_patients)
    assert film_weights(["a", "b", "c"], 1.0).tolist() == pytest.approx([1 / 3] * 3)  # one film each: no change


def test_draws_repeat_per_epoch_and_shard_across_processes(nih_patients):
    first = PatientBalancedSampler(nih_patients, 0.5, seed=3)
    again = PatientBalancedSampler(nih_patients, 0.5, seed=3)
    assert list(first) == list(again)
    again.set_epoch(1)
    assert list(first) != list(again)
    ranks = [PatientBalancedSampler(nih_patients, 0.5, seed=3, rank=r, world_size=2) for r in (0, 1)]
    shards = [list(s) for s in ranks]
    assert len(shards[0]) == len(shards[1]) == len(ranks[0]) == len(nih_patients) // 2
    assert shards[0] == list(first)[0::2][: len(shards[0])] and shards[1] == list(first)[1::2][: len(shards[1])]
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        PatientBalancedSampler(nih_patients, 1.5, seed=0)


def test_a_run_draws_its_films_by_patient(tmp_path: Path):
    """Kermany's paediatric films name their patient (person12_bacteria_1, ...): a run with patient_balance 1
    logs how many patients it balances, and its training loader draws each patient about equally often."""
    need("kermany-pneumonia")
    path = tiny_config(tmp_path, "kermany-pneumonia",
                       data={"patient_regex": r"^((?:NORMAL2-)?IM-\d+|person\d+)", "max_samples": 300},
                       preprocess={"image_size": 32}, train={"patient_balance": 1.0, "epochs": 1, "bootstrap": 0})
    cfg = load_config(path)
    run_dir = new_run(cfg)
    trainer = Trainer(cfg, run_dir)
    trainer.fit()
    train = trainer._data()[1]
    patients = Counter(r.patient_id for r in train)
    log = (run_dir / TRAIN_LOG).read_text()
    assert f"patient-balanced sampling (power 1): {len(patients)} patients" in log
    by_patient = {r.id: r.patient_id for r in train}
    drawn: Counter[str] = Counter()
    for epoch in range(3):
        loader = trainer._loader(train, True, epoch=epoch)
        assert isinstance(loader.sampler, PatientBalancedSampler)
        drawn.update(by_patient[i] for batch in loader for i in batch[2])
    assert sum(drawn.values()) == 3 * len(train)
    multi = [p for p, n in patients.items() if n > 1]
    films_share = sum(patients[p] for p in multi) / len(train)
    patients_share = len(multi) / len(patients)
    drawn_share = sum(drawn[p] for p in multi) / sum(drawn.values())
    # the films of patients with several films are drawn as often as one patient each, not one film each
    assert drawn_share == pytest.approx(patients_share, abs=0.03) and films_share > patients_share + 0.06
    with pytest.raises(ConfigError, match="train.patient_balance"):
        load_config(tiny_config(tmp_path, "kermany-pneumonia", train={"patient_balance": -0.5}))
