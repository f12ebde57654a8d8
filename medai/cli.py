"""Command line: ``python -m medai {train,evaluate,predict,explain,models,data,users,tokens,serve,...} ...``.

User errors (bad config, bad image, missing data) print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from medai import cli_trust, cli_users
from medai.errors import MedaiError

log = logging.getLogger("medai")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medai", description="MedAI CXR: train, evaluate and "
                                "serve X-ray models")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("--config", help="configs/<recipe>.yaml")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    t.add_argument("--resume", metavar="RUN", help="continue a run (id or folder) from its last epoch")
    t.add_argument("--start", metavar="RUN", help="train a run folder created (queued) earlier, from epoch 0")
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

    pr = sub.add_parser("predict", help="predict findings for images")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("images", nargs="+")
    pr.add_argument("--json", action="store_true", help="machine-readable output")

    ex = sub.add_parser("explain", help="heatmaps, anatomy shares and CTR for images")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("images", nargs="+")
    ex.add_argument("--findings", default="positive",
                    help="'positive' (above threshold), 'all', or comma-separated label names")
    ex.add_argument("--method", help="gradcam, gradcam++, hirescam, eigencam, layercam, scorecam "
                    "(default: the architecture's measured best)")
    ex.add_argument("--opacity", type=float, default=0.45)
    ex.add_argument("--out", required=True, help="folder for overlay PNGs and explanation JSON")

    sub.add_parser("models", help="list architectures and shipped checkpoints")
    cli_users.add_parser(sub)
    cli_trust.add_parser(sub)

    sv = sub.add_parser("serve", help="run the HTTP API (FastAPI + uvicorn)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)

    b = sub.add_parser("backup", help="create, list, verify, prune and restore backups (admin)")
    bsub = b.add_subparsers(dest="backup_command", required=True)
    bc = bsub.add_parser("create", help="archive models/, configs/, results/ and the database")
    bc.add_argument("--label", default="")
    bc.add_argument("--include-large", action="store_true", help="also resume states (last.pt) and caches")
    bc.add_argument("--prune", action="store_true", help="then apply --keep-last/--max-age-days (for cron)")
    bc.add_argument("--keep-last", type=int, default=7)
    bc.add_argument("--max-age-days", type=float)
    bsub.add_parser("list", help="archives, newest first")
    for name in ("verify", "restore", "delete"):
        bsub.add_parser(name, help=f"{name} an archive").add_argument("name")
    bp = bsub.add_parser("prune", help="delete archives that no retention rule keeps")
    bp.add_argument("--keep-last", type=int)
    bp.add_argument("--max-age-days", type=float)
    sub.add_parser("doctor", help="versions, device, disk, store, checkpoints and data: is all well?")

    sh = sub.add_parser("ship", help="turn a finished run into a shipped model (fp16 + card + models/NAME.md)")
    sh.add_argument("run", help="run id or folder")
    sh.add_argument("--name", required=True, help="model name, e.g. pneumonia-hybrid")
    sh.add_argument("--out", help="folder (default: the repository's models/)")
    sh.add_argument("--threshold-method", choices=["youden", "sensitivity"])
    sh.add_argument("--target-sensitivity", type=float)
    sh.add_argument("--notes", default="", help="what mattered in training (goes into the card)")
    sh.add_argument("--baseline", help="a shipped checkpoint to report beside this one")
    sh.add_argument("--also-evaluate", action="append", default=[], metavar="DATASET",
                    help="another labelled set to evaluate and report (repeatable), e.g. nih-cxr14-bbox")
    ab = sub.add_parser("attach-baseline", help="report a baseline checkpoint in a shipped model's card")
    ab.add_argument("shipped", help="the shipped checkpoint, e.g. models/pneumonia-hybrid.safetensors")
    ab.add_argument("baseline", help="the baseline's checkpoint, shipped with `ship --out` to a scratch folder")

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    di = dsub.add_parser("inspect", help="counts per label and split, patients, image sizes")
    di.add_argument("path")
    di.add_argument("--patient-regex")
    di.add_argument("--json", action="store_true")
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from medai.config import load_config
    from medai.training.callbacks import ProgressBar
    from medai import runs
    from medai.training import distributed
    from medai.training.trainer import resume, start, train

    if sum(map(bool, (args.config, args.resume, args.start))) != 1:
        raise MedaiError("train needs one of --config FILE, --resume RUN or --start RUN")
    if not distributed.under_torchrun():
        launch = _torchrun_launch(args)
        if launch:
            print(shlex.join(launch), flush=True)
            if args.print_command:
                return 0
            os.execv(launch[0], launch)  # same pid: the job system keeps tracking the run
    callbacks = [] if args.no_progress else [ProgressBar()]
    if args.resume or args.start:
        run_dir = (resume if args.resume else start)(args.resume or args.start, callbacks)
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
    if args.resume or args.start:
        run_dir = find_run(args.resume or args.start)
        cfg = load_run_config(run_dir)
        nproc = cfg.train.nproc_per_node
        if args.nproc_per_node and args.nproc_per_node != nproc:
            raise MedaiError(f"run {run_dir.name} was started on {nproc} process(es); a resume must use the "
                             "same number (the effective batch and step count depend on it)")
        forwarded += ["--resume" if args.resume else "--start", str(run_dir)]
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


def _fmt(v: Any) -> str:
    return "   -  " if v is None else f"{v:.4f}"


def _print_metrics(m: dict[str, Any]) -> None:
    print(f"{'label':<20} {'AUROC':>7} {'95% CI':>16} {'AP':>7} {'sens':>7} {'spec':>7} {'thr':>7} {'n+':>6}")
    for lab, r in m["per_class"].items():
        ci = f"{r['auroc_ci95'][0]:.3f}-{r['auroc_ci95'][1]:.3f}" if r["auroc_ci95"] else "-"
        print(f"{lab:<20} {_fmt(r['auroc']):>7} {ci:>16} {_fmt(r['ap']):>7} {_fmt(r['sensitivity']):>7} "
              f"{_fmt(r['specificity']):>7} {r['threshold']:>7.3f} {r['support']:>6}")
    mac = m["macro"]
    print(f"{'macro':<20} {_fmt(mac['auroc']):>7} {'':>16} {_fmt(mac['ap']):>7} {_fmt(mac['sensitivity']):>7} "
          f"{_fmt(mac['specificity']):>7}")
    if "accuracy" in m:
        print(f"accuracy {m['accuracy']:.4f}")
    cal = m["calibration"]
    print(f"n={m['n']}  temperature {cal['temperature']:.3f}  ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}")


def cmd_predict(args: argparse.Namespace) -> int:
    """Through the same door as the Analyze page and the API (``medai.analysis``): input gate, prediction,
    decision at the model's operating points."""
    from medai.analysis import analyze_path, flat_result
    from medai.inference import Predictor

    predictor = Predictor(args.checkpoint)
    failures = 0
    results = []
    for path in args.images:
        try:
            analysis, _ = analyze_path(predictor, path)
            results.append(flat_result(analysis, predictor.ckpt.card))
        except MedaiError as exc:
            failures += 1
            results.append({"file": path, "error": str(exc)})
            print(f"error: {exc}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                continue
            if r["status"] == "refused":
                print(f"{r['file']}: {r['refusal']}")
                continue
            print(f"{r['file']}: findings: {', '.join(r['findings']) or 'none above threshold'}")
            for lab, p in sorted(r["probabilities"].items(), key=lambda kv: -kv[1]):
                t = r["operating_points"].get(lab)
                print(f"  {lab:<20} {p:.4f}  " + (f"(threshold {t:.3f})" if t is not None else "(no finding)"))
    return 2 if failures else 0


def cmd_explain(args: argparse.Namespace) -> int:
    import re

    import numpy as np

    from medai.gate import refusal_message

    from medai.analysis import analyze_path, flat_result, overlay, to_png
    from medai.atomic import atomic_open, write_json
    from medai.imaging import resize_mask
    from medai.inference import Predictor

    predictor = Predictor(args.checkpoint)
    findings = args.findings if args.findings in ("all", "positive") else args.findings.split(",")
    out = Path(args.out)
    failures = 0
    for path in args.images:
        try:
            analysis, result = analyze_path(predictor, path, findings, args.method)
        except MedaiError as exc:
            failures += 1
            print(f"error: {exc}", file=sys.stderr)
            continue
        stem = Path(path).stem
        if result is None:  # refused by the input gate: nothing to explain
            write_json(out / f"{stem}_explanation.json", flat_result(analysis, predictor.ckpt.card))
            print(f"{path}: {refusal_message(analysis.verdict)}")
            continue
        image = analysis.image
        report = {**flat_result(analysis, predictor.ckpt.card), **result.to_dict(), "overlays": {}, "masks": {}}
        for label, heat in result.heatmaps.items():
            name = f"{stem}_{re.sub(r'[^A-Za-z0-9_.-]', '_', label)}_{result.method}.png"
            with atomic_open(out / name, "wb") as fh:
                fh.write(to_png(overlay(image.pixels, result, label, args.opacity)))
            report["overlays"][label] = name
        if result.anatomy.applicable:  # lung and heart masks, 0/255 at the image's size
            lungs = result.anatomy.right_lung | result.anatomy.left_lung
            for part, mask in (("lungs", lungs), ("heart", result.anatomy.heart)):
                name = f"{stem}_{part}_mask.png"
                with atomic_open(out / name, "wb") as fh:
                    fh.write(to_png(resize_mask(mask, image.pixels.shape).astype(np.uint8) * 255))
                report["masks"][part] = name
        write_json(out / f"{stem}_explanation.json", report)
        ctr = result.ctr.get("ctr")
        print(f"{path}: {', '.join(result.heatmaps)} ({result.method}); CTR {ctr if ctr is not None else '-'}"
              f"{'; ' + result.anatomy.reason if not result.anatomy.applicable else ''} -> {out}")
        for label, warning in result.warnings.items():
            print(f"  warning ({label}): {warning}")
    return 2 if failures else 0


def cmd_models(_args: argparse.Namespace) -> int:
    from medai.models import list_models
    from medai.models.checkpoint import read_card
    from medai.paths import SHIPPED_MODELS_DIR, medai_home

    from medai.catalog import starting_weights

    print("architectures:", ", ".join(list_models()))
    print("starting weights (model.pretrained):", ", ".join(
        f"{title} = {value}" for title, value in starting_weights().items() if value and not value.endswith(".safetensors")))
    folders = {SHIPPED_MODELS_DIR, medai_home() / "models"}
    found = sorted({p for folder in folders if folder.is_dir() for p in folder.glob("*.safetensors")})
    print("checkpoints:" if found else "checkpoints: none yet (train one with python -m medai train)")
    for path in found:
        try:
            card = read_card(path)
            auroc = card.get("metrics", {}).get("val", {}).get("macro", {}).get("auroc")
            print(f"  {path}  {card['architecture']}  {card['task']['kind']}  {len(card['labels'])} labels"
                  f"  val AUROC {_fmt(auroc)}")
        except MedaiError as exc:
            print(f"  {path}  unreadable: {exc}")
    return 0


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
                    notes=args.notes, baseline=args.baseline, also_evaluate=tuple(args.also_evaluate))
    print(f"shipped {path} ({path.stat().st_size / 2**20:.1f} MB) and {path.with_suffix('.md')}")
    return 0


def cmd_attach_baseline(args: argparse.Namespace) -> int:
    from medai.shipping import attach_baseline

    path = attach_baseline(args.shipped, args.baseline)
    print(f"{path} and {path.with_suffix('.md')} now report {Path(args.baseline).stem} as their baseline")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from medai import backup
    from medai.store import Store

    command, actor = args.backup_command, "cli"
    if command == "create":
        path = backup.create(actor, args.label, args.include_large)
        Store().audit(actor, "backup_created", name=path.name)
        print(f"created {path} ({path.stat().st_size / 2**20:.1f} MB, verified)")
        if args.prune:
            for removed in backup.prune(args.keep_last, args.max_age_days):
                print(f"pruned {removed.name}")
    elif command == "list":
        for info in backup.list_backups():
            print(f"{info.name}  {info.size / 2**20:8.1f} MB  {info.files:5d} files  {info.created_at}  "
                  f"by {info.creator}")
    elif command == "verify":
        manifest = backup.verify(backup.resolve(args.name))
        Store().audit(actor, "backup_verified", name=args.name)
        print(f"{args.name}: OK, {len(manifest['files'])} files match their SHA-256")
    elif command == "restore":
        safety = backup.restore(args.name, actor)
        Store().audit(actor, "backup_restored", name=args.name, pre_restore=safety.name)
        print(f"restored {args.name}; the previous state is in {safety.name}")
    elif command == "delete":
        backup.delete(args.name, actor)
        Store().audit(actor, "backup_deleted", name=args.name)
        print(f"deleted {args.name}")
    elif command == "prune":
        removed = backup.prune(args.keep_last, args.max_age_days, actor)
        Store().audit(actor, "backup_pruned", names=[p.name for p in removed])
        print(f"pruned {len(removed)} archives")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from medai.api import serve

    serve(args.host, args.port, "debug" if args.verbose else "info")
    return 0


def cmd_doctor(_args: argparse.Namespace) -> int:
    from medai.doctor import run_checks

    checks = run_checks()
    for check in checks:
        print(f"{'ok ' if check.ok else 'BAD'}  {check.name:<28} {check.detail}")
    return 0 if all(c.ok for c in checks) else 1


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "explain": cmd_explain,
            "models": cmd_models, "users": cli_users.run, "tokens": cli_users.run_tokens, "serve": cmd_serve,
            "ship": cmd_ship, "attach-baseline": cmd_attach_baseline, "backup": cmd_backup, "doctor": cmd_doctor,
            "anatomy": cli_trust.run, "gate": cli_trust.run_gate}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = cmd_data_inspect if args.command == "data" else COMMANDS[args.command]
    try:
        from medai.backup import recover_interrupted

        recovered = recover_interrupted()  # a restore killed half way is undone before anything reads the files
        if recovered:
            print(f"recovered after an interruption: {recovered}", file=sys.stderr)
        return handler(args)
    except MedaiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
