"""The training and model-making commands: ``train``, ``evaluate``, ``compare``, ``ship``, ``attach-baseline``,
``set-cam-stride``, ``set-cam-method``, ``note`` and ``data inspect`` (their parsers and handlers; ``medai.cli``
dispatches)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path
from typing import Any

from medai.errors import MedaiError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("--config", help="configs/<recipe>.yaml")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    t.add_argument("--resume", metavar="RUN", help="continue a run (id or folder) from its last epoch")
    t.add_argument("--queued", metavar="RUN", help="train a run folder queued earlier (by the dashboard), from epoch 0")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="train data-parallel on N local processes (one per GPU; CPU processes use gloo) by "
                        "re-launching under torchrun; sets train.nproc_per_node")
    t.add_argument("--print-command", action="store_true",
                   help="print the torchrun command this run would use and exit")

    e = sub.add_parser("evaluate", help="evaluate a checkpoint on a labelled dataset")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True, help="dataset folder/file (relative to MEDAI_DATA_DIR) or a config")
    e.add_argument("--split", default="val", help="split to evaluate (default val; 'all' for every image)")
    e.add_argument("--root", help="with a config as --data: evaluate this dataset folder with the config's "
                   "data settings instead of data.root (e.g. its eval_root)")
    e.add_argument("--out", help="folder for eval.json and predictions.csv")
    e.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples for AUROC CIs")
    e.add_argument("--batch-size", type=int, default=64)
    cp = sub.add_parser("compare", help="is model B better than model A on the same images? (paired AUROC tests)")
    cp.add_argument("a", help="model A's predictions.csv (from evaluate --out, or a run folder's predictions*.csv)")
    cp.add_argument("b", help="model B's, or a reference's scores (e.g. nih-cxr14-sample/reference_chexnet_preds.csv)")
    cp.add_argument("--bootstrap", type=int, default=1000, help="paired resamples for the macro difference")
    cp.add_argument("--out", help="also write the comparison as JSON to this file")
    sh = sub.add_parser("ship", help="turn a finished run into a shipped model (fp16 + card + models/NAME.md)")
    sh.add_argument("run", help="run id or folder")
    sh.add_argument("--name", required=True, help="model name, e.g. pneumonia-hybrid")
    sh.add_argument("--out", help="folder (default: the repository's models/)")
    sh.add_argument("--threshold-method", choices=["youden", "f1", "sensitivity"])
    sh.add_argument("--target-sensitivity", type=float)
    sh.add_argument("--notes", default="", help="what mattered in training (goes into the card)")
    sh.add_argument("--baseline", help="a shipped checkpoint to report beside this one")
    sh.add_argument("--also-evaluate", action="append", default=[], metavar="DATASET",
                    help="another labelled set to evaluate and report (repeatable), e.g. nih-cxr14-bbox")
    sh.add_argument("--epoch", type=int, help="ship the weights kept after this epoch (from 1; the run must have "
                                              "train.keep_epochs: true) instead of the best by validation AUROC")
    _add_card_parsers(sub)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    di = dsub.add_parser("inspect", help="counts per label and split, patients, image sizes")
    di.add_argument("path")
    di.add_argument("--patient-regex")
    di.add_argument("--json", action="store_true")


def _add_card_parsers(sub: argparse._SubParsersAction) -> None:
    """The commands that change a shipped model's card and never its weights."""
    ab = sub.add_parser("attach-baseline", help="report a baseline checkpoint in a shipped model's card")
    ab.add_argument("shipped", help="the shipped checkpoint, e.g. models/pneumonia-hybrid.safetensors")
    ab.add_argument("baseline", help="the baseline's checkpoint, shipped with `ship --out` to a scratch folder")
    cs = sub.add_parser("set-cam-stride", help="explain a shipped EfficientNet-Lite at another layer (card only)")
    cs.add_argument("shipped", help="the shipped checkpoint, e.g. models/nih14-efficientnet-lite0.safetensors")
    cs.add_argument("stride", type=int, choices=[16, 32], help="16: the last stride-16 block; 32: the head")
    cs.add_argument("--smooth", type=float, default=0.0,
                    help="Gaussian smoothing of the heatmap grid, sigma in grid cells (0 = none)")
    cs.add_argument("--note", default="", help="what was measured (added to the card's notes)")
    cm = sub.add_parser("set-cam-method", help="make another heatmap method a shipped model's default (card only)")
    cm.add_argument("shipped", help="the shipped checkpoint, e.g. models/pneumonia-hybrid.safetensors")
    cm.add_argument("method", help="gradcam, gradcam++, hirescam, eigencam, layercam or scorecam")
    cm.add_argument("--note", default="", help="what was measured (added to the card's notes)")
    nt = sub.add_parser("note", help="add what was measured to a shipped model's card (card only)")
    nt.add_argument("shipped", help="the shipped checkpoint, e.g. models/pneumonia-hybrid.safetensors")
    nt.add_argument("note", help="what was measured, with the date and how to reproduce it")


def cmd_train(args: argparse.Namespace) -> int:
    from medai.config import load_config
    from medai.training.callbacks import ProgressBar
    from medai import runs
    from medai.training import distributed
    from medai.training.trainer import resume, start, train

    if sum(map(bool, (args.config, args.resume, args.queued))) != 1:
        raise MedaiError("train needs one of --config FILE, --resume RUN or --queued RUN")
    if not distributed.under_torchrun():
        launch = _torchrun_launch(args)
        if launch:
            print(shlex.join(launch), flush=True)
            if args.print_command:
                return 0
            os.execv(launch[0], launch)  # same pid: the job system keeps tracking the run
    callbacks = [] if args.no_progress else [ProgressBar()]
    if args.resume or args.queued:
        run_dir = (resume if args.resume else start)(args.resume or args.queued, callbacks)
    else:
        run_dir = train(load_config(args.config, args.overrides), callbacks)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports for the run
    status = runs.read_status(run_dir)
    print(f"run {run_dir.name}: {status.get('state')} (best val AUROC {status.get('best_val_auroc')}) -> {run_dir}")
    return 0 if status.get("state") == runs.FINISHED else 3


def _torchrun_launch(args: argparse.Namespace) -> list[str] | None:
    """The torchrun command for a run whose config (or --nproc-per-node) asks for several processes on
    this machine; None for a single process (unless --print-command asks to see it anyway)."""
    from medai.config import load_config
    from medai.training import distributed
    from medai.precision import resolve_device
    from medai.runs import find_run, load_run_config

    forwarded = ["train"]
    if args.resume or args.queued:
        run_dir = find_run(args.resume or args.queued)
        cfg = load_run_config(run_dir)
        nproc = cfg.train.nproc_per_node
        if args.nproc_per_node and args.nproc_per_node != nproc:
            raise MedaiError(f"run {run_dir.name} was started on {nproc} process(es); a resume must use the "
                             "same number (the effective batch and step count depend on it)")
        forwarded += ["--resume" if args.resume else "--queued", str(run_dir)]
    else:
        overrides = list(args.overrides)
        if args.nproc_per_node:
            overrides.append(f"train.nproc_per_node={args.nproc_per_node}")
        cfg = load_config(args.config, overrides)
        nproc = cfg.train.nproc_per_node
        forwarded += ["--config", args.config, *(a for o in overrides for a in ("--set", o))]
    if args.no_progress:
        forwarded.append("--no-progress")
    if nproc == 1 and not args.print_command:
        return None
    distributed.check_nproc(nproc, resolve_device(cfg.train.device))
    return distributed.torchrun_command(nproc, forwarded)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medai.atomic import write_json
    from medai.config import DataConfig, load_config
    from medai.evaluation.report import write_predictions_csv
    from medai.evaluation.runner import evaluate_checkpoint
    from medai.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    data_cfg = load_config(args.data).data if args.data.endswith((".yaml", ".yml")) else DataConfig(root=args.data)
    result = evaluate_checkpoint(ckpt, data_cfg, args.split, root=args.root, n_boot=args.bootstrap,
                                 batch_size=args.batch_size)
    if args.out:
        out = Path(args.out)
        write_json(out / "eval.json", result.metrics)
        preds = result.preds
        write_predictions_csv(out / "predictions.csv", preds["ids"], preds["patients"], preds["targets"],
                              result.probs, ckpt.card["labels"])
    _print_metrics(result.metrics)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from medai.atomic import write_json
    from medai.evaluation.compare import compare_tables
    from medai.evaluation.report import read_predictions_csv

    if args.bootstrap < 100:
        raise MedaiError("--bootstrap needs at least 100 resamples for a 95% interval")
    out = compare_tables(read_predictions_csv(args.a), read_predictions_csv(args.b), n_boot=args.bootstrap)
    out["a"], out["b"] = str(args.a), str(args.b)
    if args.out:
        write_json(Path(args.out), out)
    extra = out["only_in_a"] or out["only_in_b"]
    print(f"B = {args.b}\nA = {args.a}\n{out['n']} images in both"
          + (f" ({out['only_in_a']} only in A, {out['only_in_b']} only in B)" if extra else ""))
    print(f"{'finding':<20} {'n+':>5} {'AUROC A':>8} {'AUROC B':>8} {'B - A':>8} {'95% CI':>17} {'p':>7}")
    for lab, r in [*out["per_class"].items(), (f"macro ({out['macro']['findings']})", out["macro"])]:
        ci = f"{r['ci95'][0]:+.3f}..{r['ci95'][1]:+.3f}"
        print(f"{lab:<20} {r.get('support', ''):>5} {r['auroc_a']:>8.4f} {r['auroc_b']:>8.4f} {r['diff']:>+8.4f} "
              f"{ci:>17} {_p(r['p']):>7}")
    print(f"per finding DeLong's test; macro: paired bootstrap over images ({out['n_boot']} resamples)")
    return 0


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt(v: Any) -> str:
    return "   -  " if v is None else f"{v:.4f}"


def _print_metrics(m: dict[str, Any]) -> None:
    print(f"{'label':<20} {'AUROC':>7} {'95% CI':>16} {'AP':>7} {'sens':>7} {'spec':>7} {'thr':>7} {'n+':>6}")
    for lab, r in m["per_class"].items():
        ci = f"{r['auroc_ci95'][0]:.3f}-{r['auroc_ci95'][1]:.3f}" if r["auroc_ci95"] else "-"
        print(f"{lab:<20} {fmt(r['auroc']):>7} {ci:>16} {fmt(r['ap']):>7} {fmt(r['sensitivity']):>7} "
              f"{fmt(r['specificity']):>7} {r['threshold']:>7.3f} {r['support']:>6}")
    mac = m["macro"]
    print(f"{'macro':<20} {fmt(mac['auroc']):>7} {'':>16} {fmt(mac['ap']):>7} {fmt(mac['sensitivity']):>7} "
          f"{fmt(mac['specificity']):>7}")
    if "accuracy" in m:
        print(f"accuracy {m['accuracy']:.4f}")
    cal = m["calibration"]
    print(f"n={m['n']}  temperature {cal['temperature']:.3f}  ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}")


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from medai.config import DataConfig
    from medai.data.datasets import load_records

    recset = load_records(DataConfig(root=args.path, patient_regex=args.patient_regex))
    summary = recset.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['root']}  format={summary['format']}  task={summary['kind']}  labels={len(recset.labels)}")
    splits = summary["splits"]
    print(f"{'label':<22}" + "".join(f"{s:>10}" for s in splits))
    for lab in recset.labels:
        print(f"{lab:<22}" + "".join(f"{splits[s]['per_label'][lab]:>10}" for s in splits))
    print(f"{'images':<22}" + "".join(f"{splits[s]['images']:>10}" for s in splits))
    print(f"{'patients':<22}" + "".join(f"{splits[s]['patients']:>10}" for s in splits))
    return 0


def cmd_ship(args: argparse.Namespace) -> int:
    from medai.shipping import ship_run

    path = ship_run(args.run, args.name, out_dir=Path(args.out) if args.out else None,
                    threshold_method=args.threshold_method, target_sensitivity=args.target_sensitivity,
                    notes=args.notes, baseline=args.baseline, also_evaluate=tuple(args.also_evaluate),
                    epoch=args.epoch)
    print(f"shipped {path} ({path.stat().st_size / 2**20:.1f} MB) and {path.with_suffix('.md')}")
    return 0


def cmd_attach_baseline(args: argparse.Namespace) -> int:
    from medai.shipping import attach_baseline

    path = attach_baseline(args.shipped, args.baseline)
    print(f"{path} and {path.with_suffix('.md')} now report {Path(args.baseline).stem} as their baseline")
    return 0


def cmd_set_cam_stride(args: argparse.Namespace) -> int:
    from medai.shipping import set_cam_stride

    path = set_cam_stride(args.shipped, args.stride, args.note, args.smooth)
    smooth = f", the grid smoothed by {args.smooth} cells" if args.smooth else ""
    print(f"{path} and {path.with_suffix('.md')} now explain at stride {args.stride}{smooth}")
    return 0


def cmd_set_cam_method(args: argparse.Namespace) -> int:
    from medai.shipping import set_cam_method

    path = set_cam_method(args.shipped, args.method, args.note)
    print(f"{path} and {path.with_suffix('.md')} now explain with {args.method} unless the reader picks another")
    return 0


def cmd_note(args: argparse.Namespace) -> int:
    from medai.shipping import add_note

    path = add_note(args.shipped, args.note)
    print(f"{path} and {path.with_suffix('.md')} now carry the note")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "compare": cmd_compare, "ship": cmd_ship,
            "attach-baseline": cmd_attach_baseline, "set-cam-stride": cmd_set_cam_stride,
            "set-cam-method": cmd_set_cam_method, "note": cmd_note, "data": cmd_data_inspect}
