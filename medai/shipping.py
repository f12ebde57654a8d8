"""Turn a finished training run into a shipped model: compact fp16 weights, a complete model card in the
checkpoint, and the same card rendered as ``models/<name>.md``.

The card's validation numbers are computed here from the fp16 weights actually shipped, through the same
:func:`medai.evaluation.runner.evaluate_checkpoint` that ``python -m medai evaluate`` uses, so the command
reproduces them exactly.
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from medai import runs
from medai.atomic import write_text
from medai.config import ExperimentConfig, config_from_dict, load_config
from medai.data.mixing import describe_extra_train
from medai.data.sources import training_data_info
from medai.errors import ConfigError, MedaiError
from medai.evaluation.compare import compare_tables
from medai.evaluation.report import PredictionTable, read_predictions_csv
from medai.evaluation.runner import evaluate_checkpoint
from medai.models import create_model
from medai.models.checkpoint import load_checkpoint, read_card, save_checkpoint, update_card
from medai.paths import SHIPPED_MODELS_DIR, resolve_data_path, runs_dir

NOT_FOR_DIAGNOSIS = ("Research and decision-support use by trained readers only; not a medical device and not "
                     "for diagnosis.")
def _training_facts(run_dir: Path, card: dict[str, Any]) -> dict[str, Any]:
    epochs = runs.epoch_records(run_dir)
    status = runs.read_status(run_dir)
    return {"run_id": run_dir.name, "epochs_run": len(epochs), "best_epoch": status.get("best_epoch"),
            "time_s": round(sum(r.get("epoch_time_s", 0.0) for r in epochs), 1),
            "images_per_s": round(float(np.median([r["images_per_s"] for r in epochs])), 1) if epochs else None,
            "hardware": card.get("training", {}).get("hardware")  # set by a run's final evaluation; else:
            or f"{platform.processor() or platform.machine()} / {status.get('device')} / {status.get('precision')}",
            "curve": [{"epoch": r["epoch"], "train_loss": round(r["train_loss"], 4),
                       "val_auroc": round(r["val_auroc"], 4)} for r in epochs]}


def _reference_aurocs(root: str, labels: list[str], ids: list[str], targets: np.ndarray,
                      probs: np.ndarray, n_boot: int) -> dict[str, Any] | None:
    """Per-finding AUROC of the published CheXNet probabilities shipped with the NIH sample, if present, and
    the model's paired difference from them on the same images (DeLong per finding, bootstrap for the mean)."""
    path = resolve_data_path(root) / "reference_chexnet_preds.csv"
    if not path.is_file():
        return None
    ref = read_predictions_csv(path)
    ref = PredictionTable([Path(i).stem for i in ref.ids], ref.labels, None, ref.probs)  # .png or .jpg alike
    ours = PredictionTable([Path(i).stem for i in ids], labels, targets.astype(int), probs)
    if not set(ours.ids) <= set(ref.ids) or not set(labels) <= set(ref.labels):
        return None
    paired = compare_tables(ref, ours, n_boot=max(n_boot, 200))
    per_class = paired["per_class"]
    return {"name": "published CheXNet (DenseNet121, ~78k NIH images)",
            "per_class_auroc": {lab: per_class[lab]["auroc_a"] if lab in per_class else None for lab in labels},
            "macro_auroc": paired["macro"]["auroc_a"],
            "model_minus_reference": {"per_class": {lab: {k: r[k] for k in ("diff", "ci95", "p")}
                                                    for lab, r in per_class.items()},
                                      "macro": {k: paired["macro"][k] for k in ("diff", "ci95", "p")},
                                      "tests": "DeLong per finding; paired bootstrap over images for the macro mean"}}


def _weights_to_ship(run_dir: Path, epoch: int | None) -> Path:
    """The run's best weights, or those it kept after ``epoch`` (from 1) with ``train.keep_epochs``."""
    if epoch is None:
        best = run_dir / runs.BEST_WEIGHTS
        if not best.is_file():
            raise MedaiError(f"{run_dir} has no {runs.BEST_WEIGHTS}; is it a finished training run?")
        return best
    path = runs.epoch_weights(run_dir, epoch)
    if not path.is_file():
        kept = runs.kept_epochs(run_dir)
        raise MedaiError(f"{run_dir.name} kept no weights for epoch {epoch}: " + (
            f"it kept epochs {', '.join(map(str, kept))}" if kept else
            "a run keeps every epoch's weights only when trained with train.keep_epochs: true"))
    return path


def ship_run(run: str | Path, name: str, *, out_dir: Path | None = None, threshold_method: str | None = None,
             target_sensitivity: float | None = None, notes: str = "", baseline: str | Path | None = None,
             n_boot: int = 500, also_evaluate: tuple[str, ...] = (), epoch: int | None = None) -> Path:
    """Write ``<out_dir>/<name>.safetensors`` (fp16) and ``<name>.md`` from a finished run: its best weights,
    or with ``epoch`` (from 1) those it kept after that epoch (``train.keep_epochs``). ``also_evaluate``:
    more labelled sets (e.g. the NIH bounding-box images) evaluated like ``data.eval_root``."""
    run_dir = Path(run) if Path(run).is_dir() else runs_dir() / str(run)
    best = _weights_to_ship(run_dir, epoch)
    cfg: ExperimentConfig = load_config(run_dir / "config.yaml")
    out_dir = Path(out_dir or SHIPPED_MODELS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}.safetensors"
    source = load_checkpoint(best)
    card = {k: v for k, v in source.card.items() if k != "epoch"}
    save_checkpoint(source.model, card, target, dtype=torch.float16)
    method = threshold_method or cfg.train.threshold_method
    sens = target_sensitivity or cfg.train.target_sensitivity
    val = evaluate_checkpoint(load_checkpoint(target), cfg.data, cfg.data.val_split, fit=True,
                              threshold_method=method, target_sensitivity=sens, n_boot=n_boot)
    metrics = {k: v for k, v in val.metrics.items() if k not in ("checkpoint",)}
    card.update(thresholds={lab: metrics["per_class"][lab]["threshold"] for lab in card["labels"]},
                temperature=metrics["calibration"]["temperature"])
    report: dict[str, Any] = {"val": metrics}
    save_checkpoint(source.model, card, target, dtype=torch.float16)  # external evals use these thresholds
    every_image = dataclasses.replace(cfg.data, max_samples=None)  # as the trainer's external evaluation
    for index, root in enumerate(([cfg.data.eval_root] if cfg.data.eval_root else []) + list(also_evaluate)):
        ext = evaluate_checkpoint(load_checkpoint(target), every_image, "all", root=root, n_boot=n_boot)
        reference = _reference_aurocs(root, card["labels"], ext.preds["ids"], ext.preds["targets"], ext.probs, n_boot)
        metrics = {k: v for k, v in ext.metrics.items() if k != "checkpoint"}
        if index == 0 and cfg.data.eval_root:
            report["external"] = metrics
            if reference:
                report["external_reference"] = reference
        else:
            report.setdefault("external_more", []).append({"metrics": metrics, "reference": reference})
    info = training_data_info(cfg.data)
    card["metrics"] = report
    card["model_card"] = {
        "name": name, "parameters": sum(p.numel() for p in source.model.parameters()),
        "data": {**info, "summary": card.get("data_summary")},
        "training": {**_training_facts(run_dir, card), "shipped_epoch": epoch}, "notes": notes,
        "intended_use": NOT_FOR_DIAGNOSIS, "limitations": info["limitations"],
        "baseline": _baseline_summary(baseline) if baseline else None,
    }
    card["intended_use"], card["limitations"] = NOT_FOR_DIAGNOSIS, info["limitations"]
    card["model_card"]["recipe"] = _recipe_file(cfg.name)
    save_checkpoint(source.model, card, target, dtype=torch.float16)
    write_card_markdown(target, card)
    return target


def write_card_markdown(weights: Path, card: dict[str, Any]) -> Path:
    """``models/<name>.md`` beside the weights, with their size on disk (known only once they are saved)."""
    card = {**card, "model_card": {**card["model_card"], "file_mb": round(weights.stat().st_size / 2**20, 1)}}
    markdown = weights.with_suffix(".md")
    write_text(markdown, render_card(card))
    return markdown


def _recipe_file(name: str) -> str | None:
    """The configs/ file whose ``name`` is the run's (to print a reproduce command)."""
    from medai.paths import PROJECT_ROOT

    for path in sorted((PROJECT_ROOT / "configs").glob("*.yaml")):
        try:
            if load_config(path).name == name:
                return f"configs/{path.name}"
        except MedaiError:
            continue
    return None


def _baseline_summary(path: str | Path) -> dict[str, Any]:
    other = read_card(path)
    val = other["metrics"]["val"]
    out = {"name": Path(path).stem, "architecture": other["architecture"], "macro": val["macro"],
           "ece_after": val["calibration"]["ece_after"],
           "auroc_ci95": {lab: c["auroc_ci95"] for lab, c in val["per_class"].items()},
           "epochs_run": other.get("model_card", {}).get("training", {}).get("epochs_run"),
           "schedule": training_schedule(other),
           "shipped": Path(path).resolve().parent == Path(SHIPPED_MODELS_DIR).resolve()}
    if "external" in other["metrics"]:
        out["external_macro_auroc"] = other["metrics"]["external"]["macro"]["auroc"]
    return out


def training_schedule(card: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs comparable: the data, the input size and the planned epochs."""
    cfg = card.get("training_config", {})
    data = cfg.get("data", {})
    added = [extra.get("root") for extra in data.get("extra_train") or []]  # another set's films: other data
    return {"data": " + ".join([data.get("root"), *added]) if added else data.get("root"),
            "image_size": card.get("preprocessing", {}).get("image_size"), "epochs": cfg.get("train", {}).get("epochs")}


def _recard(shipped: str | Path, change: Callable[[dict[str, Any]], dict[str, Any]]) -> Path:
    """Rewrite the card of the already shipped ``shipped`` with ``change`` (card -> card) and re-render its
    Markdown (``update_card``: the weights stay byte for byte); the new card must still build the model."""
    shipped = Path(shipped)
    card = read_card(shipped)
    if "model_card" not in card:
        raise MedaiError(f"{shipped} has no model card; ship it with `python -m medai ship` first")
    card = change(dict(card))
    try:  # an unknown keyword is create_model's ConfigError already
        create_model(card["architecture"], len(card["labels"]), **card.get("model_kwargs", {}))
    except ValueError as exc:
        raise MedaiError(f"{shipped.name}: {exc}") from None
    update_card(shipped, **card)
    write_card_markdown(shipped, card)
    return shipped


def attach_baseline(shipped: str | Path, baseline: str | Path) -> Path:
    """Report ``baseline`` (a checkpoint shipped with ``ship``, e.g. to a scratch folder) in the card of
    the already shipped ``shipped``, and re-render its Markdown. The weights are left as they are."""
    summary = _baseline_summary(baseline)

    def change(card: dict[str, Any]) -> dict[str, Any]:
        ours = training_schedule(card)["data"]
        if summary["schedule"]["data"] != ours:
            raise MedaiError(f"the baseline was trained on {summary['schedule']['data']}, this model on {ours}: "
                             "not comparable")
        return {**card, "model_card": {**card["model_card"], "baseline": summary}}
    return _recard(shipped, change)


def _noted(card: dict[str, Any], note: str) -> dict[str, Any]:
    """``card["model_card"]`` with ``note`` (what was measured) added to its notes."""
    notes = " ".join(part for part in (card["model_card"].get("notes", ""), note.strip()) if part)
    return {**card["model_card"], "notes": notes}


def add_note(shipped: str | Path, note: str) -> Path:
    """Add ``note`` (something measured about the shipped model after it shipped) to its card's notes; the
    weights and every setting stay as they are."""
    if not note.strip():
        raise MedaiError("the note is empty: say what was measured")
    return _recard(shipped, lambda card: {**card, "model_card": _noted(card, note)})


def set_cam_stride(shipped: str | Path, stride: int, note: str, smooth: float = 0.0) -> Path:
    """Explain the shipped EfficientNet-Lite ``shipped`` at another layer (``model_kwargs.cam_stride``;
    its default heatmap method follows), its grid smoothed by ``smooth`` cells (``cam_smooth``, 0 = none),
    with ``note`` (what was measured) added to its card's notes."""
    def change(card: dict[str, Any]) -> dict[str, Any]:  # an architecture without cam_stride is refused
        kwargs = {**card.get("model_kwargs", {}), "cam_stride": stride, "cam_smooth": smooth}
        if not smooth:  # no smoothing: the key goes, as on a card that never had it
            del kwargs["cam_smooth"]
        return {**card, "model_kwargs": kwargs, "model_card": _noted(card, note)}
    return _recard(shipped, change)


def set_cam_method(shipped: str | Path, method: str, note: str) -> Path:
    """Make ``method`` the default heatmap of the shipped ``shipped`` (its stored config's
    ``model.cam_method``, which changes nothing in training without ``train.attention_loss``), with
    ``note`` (what was measured) added to its card's notes. The config's own validation judges ``method``."""
    def change(card: dict[str, Any]) -> dict[str, Any]:
        cfg = card.get("training_config", {})
        cfg = {**cfg, "model": {**cfg.get("model", {}), "cam_method": method}}
        try:
            config_from_dict(cfg)
        except ConfigError as exc:
            raise MedaiError(f"{Path(shipped).name}: {exc}") from None
        return {**card, "training_config": cfg, "model_card": _noted(card, note)}
    return _recard(shipped, change)


def _num(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(c: list[float] | None) -> str:
    return f" ({c[0]:.3f}-{c[1]:.3f})" if c else ""


def _metrics_table(m: dict[str, Any], reference: dict[str, Any] | None = None) -> list[str]:
    head = "| label | support | AUROC (95% CI) | AP | threshold | sensitivity | specificity |"
    paired = (reference or {}).get("model_minus_reference")
    rows = [head + (" reference AUROC |" if reference else "") + (" difference (95% CI), p |" if paired else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if reference else "") + ("---|" if paired else "")]
    for lab, c in m["per_class"].items():
        row = (f"| {lab} | {c['support']} | {_num(c['auroc'])}{_ci(c['auroc_ci95'])} | {_num(c['ap'])} | "
               f"{_num(c['threshold'])} | {_num(c.get('sensitivity'))} | {_num(c.get('specificity'))} |")
        if reference:
            row += f" {_num(reference['per_class_auroc'].get(lab))} |"
        if paired:
            row += f" {_difference(paired['per_class'].get(lab))} |"
        rows.append(row)
    mac = m["macro"]
    rows.append(f"| **macro** | {m['n']} | **{_num(mac['auroc'])}** | {_num(mac['ap'])} | | "
                f"{_num(mac['sensitivity'])} | {_num(mac['specificity'])} |"
                + (f" **{_num(reference['macro_auroc'])}** |" if reference else "")
                + (f" **{_difference(paired['macro'])}** |" if paired else ""))
    return rows


def _difference(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    p = "p < 0.001" if d["p"] < 0.001 else f"p {d['p']:.3f}"
    return f"{d['diff']:+.3f} ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}), {p}"


def _baseline_section(card: dict[str, Any]) -> list[str]:
    """The Baseline section: its schedule, where its weights are, and both models' macro numbers."""
    mc, val = card["model_card"], card["metrics"]["val"]
    base = mc["baseline"]
    cal = val["calibration"]
    ours, theirs = training_schedule(card), base.get("schedule") or {}
    same = ("same data and schedule" if theirs == ours else
            f"same data; {theirs.get('image_size')} px, {theirs.get('epochs')} epochs planned")
    has_ext = base.get("external_macro_auroc") is not None
    where = (f"shipped as `models/{base['name']}.safetensors`" if base.get("shipped") else
             "weights not shipped (retrain with its recipe)")
    lines = ["", "## Baseline", f"`{base['name']}`: {base['architecture']}, {same}, {base.get('epochs_run')} "
             f"epochs run; {where}. Validation, macro over labels:", "",
             "| model | AUROC | AP | sensitivity | specificity | ECE after scaling |" +
             (" external AUROC |" if has_ext else ""), "|---|---|---|---|---|---|" + ("---|" if has_ext else "")]
    external = card["metrics"].get("external", {}).get("macro", {}).get("auroc")
    for label, m, ece, ext_auroc in ((mc["name"], val["macro"], cal["ece_after"], external),
                                     (base["name"], base["macro"], base["ece_after"],
                                      base.get("external_macro_auroc"))):
        lines.append(f"| {label} | {_num(m['auroc'])} | {_num(m['ap'])} | {_num(m['sensitivity'])} | "
                     f"{_num(m['specificity'])} | {_num(ece, 4)} |"
                     + (f" {_num(ext_auroc)} |" if has_ext else ""))
    return lines


def _epochs_shipped(tr: dict[str, Any]) -> str:
    """Which epoch's weights ship, counted from 1 as the Train page counts (the run records count from 0)."""
    best = "?" if tr.get("best_epoch") is None else tr["best_epoch"] + 1
    if tr.get("shipped_epoch") is None:
        return f"best epoch {best} (by validation AUROC; its weights ship)"
    return f"shipped epoch {tr['shipped_epoch']} (the best by validation AUROC was epoch {best})"


def _data_lines(data: dict[str, Any]) -> list[str]:
    summary = data.get("summary") or {}
    lines = [f"- Source: {data['source']}", f"- Licence: {data['licence']}",
             *(f"- Training also drew on: {more['source']} (licence: {more['licence']})"
               for more in data.get("also", [])),
             f"- Split: by patient, patient-disjoint: {summary.get('patient_disjoint')}"]
    for split, counts in summary.get("used", {}).items():
        per = ", ".join(f"{k} {v}" for k, v in counts["per_label"].items())
        lines.append(f"- {split}: {counts['images']} images, {counts['patients']} patients ({per})")
        if split == "train":  # the films data.extra_train added, under the split they were added to
            lines += [f"  - of these, {line}" for line in describe_extra_train(summary.get("extra_train") or [])]
    return lines


def render_card(card: dict[str, Any]) -> str:
    """The model card as Markdown (the Models page and ``models/<name>.md`` show it)."""
    mc = card["model_card"]
    tr, data, val = mc["training"], mc["data"], card["metrics"]["val"]
    cal = val["calibration"]
    cfg = card.get("training_config", {})
    lines = [f"# Model card: {mc['name']}", "",
             f"**Task**: {card['task'].get('name')} ({card['task']['kind']}); labels: {', '.join(card['labels'])}.",
             f"**Architecture**: `{card['architecture']}` {card.get('model_kwargs') or ''}, "
             f"{mc['parameters'] / 1e6:.2f} M parameters, fp16 weights ({mc.get('file_mb', '?')} MB); input "
             f"{card['preprocessing']['image_size']} px grayscale.", "",
             "## Training data", *_data_lines(data), "", "## Training",
              f"- Config: `{mc.get('recipe') or card['task'].get('name')}` (stored in the card as "
              f"`training_config`); epochs run {tr['epochs_run']} of {cfg.get('train', {}).get('epochs')}, "
              + _epochs_shipped(tr),
              f"- Time: {tr['time_s'] / 60:.1f} min on {tr['hardware']} ({tr['images_per_s']} images/s)"]
    if mc.get("notes"):
        lines.append(f"- What mattered: {mc['notes']}")
    lines += ["", "## Validation", f"Threshold rule: {val.get('threshold_method')}. Temperature "
              f"{cal['temperature']:.3f}; ECE {cal['ece_before']:.4f} before, {cal['ece_after']:.4f} after "
              "temperature scaling.", "", *_metrics_table(val)]
    ext = card["metrics"].get("external")
    if ext:
        lines += ["", f"## External evaluation: {Path(ext['data']['root']).name} ({ext['n']} images)",
                  "Thresholds and temperature from validation. Reference column: a published CheXNet's "
                  "probabilities for the same images; difference: this model's AUROC minus the reference's on "
                  "them (DeLong's test per finding, a paired bootstrap for the macro mean).", "",
                  *_metrics_table(ext, card["metrics"].get("external_reference"))]
    for more in card["metrics"].get("external_more", []):
        m = more["metrics"]
        lines += ["", f"## External evaluation: {Path(m['data']['root']).name} ({m['n']} images)",
                  "Thresholds and temperature from validation.", "", *_metrics_table(m, more.get("reference"))]
    if mc.get("baseline"):
        lines += _baseline_section(card)
    lines += ["", "## Intended use", mc["intended_use"], "", "## Known limitations", mc["limitations"], "",
              "Reproduce the validation numbers: `python -m medai evaluate --checkpoint "
              f"models/{mc['name']}.safetensors --data {mc.get('recipe') or 'configs/<recipe>.yaml'} --split val`",
              ""]
    return "\n".join(lines)
