"""Patient-balanced sampling: how often an epoch draws each training film.

NIH ChestX-ray14's training films come from patients with very different numbers of films (in the shipped
recipe's split the median film's patient has 7, the most 69), while an external set such as
``nih-cxr14-sample`` holds one film per patient. With ``train.patient_balance`` = a, each film is drawn with
probability proportional to ``n ** -a``, n being its patient's film count in the split: 0 draws every film
equally (plain shuffling, the default), 1 every patient equally, 0.5 lies between. An epoch still draws as
many films as the split holds, with replacement, so its step count, learning-rate schedule and weight
average are those of an unbalanced run. A layout without patient ids has one patient per film, where every
power draws every film equally.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def film_weights(patients: Sequence[str], power: float) -> torch.Tensor:
    """Each film's draw probability: ``n ** -power`` for a patient with n films, normalised to sum to 1."""
    counts = Counter(patients)
    weights = torch.tensor([counts[p] ** -power for p in patients], dtype=torch.float64)
    return weights / weights.sum()


def effective_films(weights: torch.Tensor) -> float:
    """Kish's effective sample size of a draw with these probabilities: how many equally weighted films it is
    worth. The split's size at power 0; at power 1, ``P ** 2 / sum(1 / n)`` over its P patients, between P and
    the number of films."""
    return float(1.0 / (weights**2).sum())


class PatientBalancedSampler(Sampler[int]):
    """Draws an epoch's films by :func:`film_weights`, reproducibly per (seed, epoch). Under torchrun every
    rank draws the same sequence and takes every ``world_size``-th draw from its ``rank``-th, so each rank
    trains on as many films as the others (a film drawn twice may land on two ranks)."""

    def __init__(self, patients: Sequence[str], power: float, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= power <= 1:
            raise ValueError(f"patient balance power must be in [0, 1], got {power}")
        self.weights = film_weights(patients, power)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_samples = len(patients) // world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        drawn = torch.multinomial(self.weights, self.num_samples * self.world_size, replacement=True, generator=gen)
        return iter(drawn[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples
