"""The checkpoints this installation can serve: shipped (repository ``models/``), installed
(``$MEDAI_HOME/models``) and trained (``best.safetensors`` of finished runs under ``results/runs``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medai import runs
from medai.errors import MedaiError
from medai.models.checkpoint import read_card
from medai.paths import SHIPPED_MODELS_DIR, medai_home, runs_dir

DEFAULT_MODEL = "nih14-efficientnet-lite0"  # the 14-finding chest model: what Analyze, the API and the PACS node use unless told otherwise


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    source: str  # shipped | installed | run
    card: dict[str, Any]

    @property
    def val_auroc(self) -> float | None:
        val = self.card.get("metrics", {}).get("val", {})
        return val.get("macro", {}).get("auroc") if isinstance(val, dict) else None

    def row(self) -> dict[str, Any]:
        return {"model": self.name, "source": self.source, "architecture": self.card["architecture"],
                "task": self.card["task"].get("name") or self.card["task"]["kind"],
                "labels": ", ".join(self.card["labels"]), "val AUROC": self.val_auroc}


def list_models(include_runs: bool = True) -> tuple[list[ModelEntry], list[str]]:
    """All readable checkpoints (shipped first, then by name) and one message per unreadable file."""
    found: list[tuple[str, Path, str]] = []
    for folder, source in ((SHIPPED_MODELS_DIR, "shipped"), (medai_home() / "models", "installed")):
        if folder.is_dir():
            found += [(p.stem, p, source) for p in sorted(folder.glob("*.safetensors"))]
    if include_runs and runs_dir().is_dir():
        found += [(run.name, run / runs.BEST_WEIGHTS, "run") for run in sorted(runs_dir().iterdir())
                  if runs.is_finished(run)]
    entries, problems, seen = [], [], set()
    for name, path, source in found:
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        try:
            entries.append(ModelEntry(name, path, source, read_card(path)))
        except MedaiError as exc:
            problems.append(str(exc))
    return entries, problems


def starting_weights() -> dict[str, str]:
    """What a run may start from, title -> ``model.pretrained`` value: random initialisation, the ImageNet
    weights of every installed weights package, then every checkpoint this installation can serve."""
    from medai.models.pretrained import WEIGHT_SOURCES

    options = {"none (random initialisation)": ""}
    for source in WEIGHT_SOURCES.values():
        try:
            source.path()
        except MedaiError:
            continue  # package not installed: not offered
        options[source.title] = source.key
    entries, _problems = list_models()
    return options | {f"{e.name} ({e.source})": str(e.path) for e in entries}


def default_index(entries: list[ModelEntry]) -> int:
    """Position of :data:`DEFAULT_MODEL` in ``entries`` (the first entry when it is absent)."""
    names = [e.name for e in entries]
    return names.index(DEFAULT_MODEL) if DEFAULT_MODEL in names else 0
