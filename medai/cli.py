"""Command line: ``python -m medai {train,evaluate,predict,explain,models,data,users,tokens,serve,...} ...``.

User errors (bad config, bad image, missing data) print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from medai import cli_pacs, cli_train, cli_trust, cli_users
from medai.cli_train import fmt as _fmt
from medai.errors import MedaiError

log = logging.getLogger("medai")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medai", description="MedAI CXR: train, evaluate and "
                                "serve X-ray models")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    cli_train.add_parsers(sub)
    _analysis_parsers(sub)
    sub.add_parser("models", help="list architectures and shipped checkpoints")
    cli_users.add_parser(sub)
    cli_trust.add_parser(sub)
    cli_pacs.add_parser(sub)
    sv = sub.add_parser("serve", help="run the HTTP API (FastAPI + uvicorn)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    _backup_parser(sub)
    sub.add_parser("doctor", help="versions, device, disk, store, checkpoints and data: is all well?")
    return p


def _analysis_parsers(sub: argparse._SubParsersAction) -> None:
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


def _backup_parser(sub: argparse._SubParsersAction) -> None:
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
    from medai.catalog import list_models, starting_weights
    from medai.models import architectures

    print("architectures:", ", ".join(architectures()))
    print("starting weights (model.pretrained):", ", ".join(
        f"{title} = {value}" for title, value in starting_weights().items() if value and not value.endswith(".safetensors")))
    entries, problems = list_models(include_runs=False)
    print("checkpoints:" if entries or problems else "checkpoints: none yet (train one with python -m medai train)")
    for entry in entries:
        print(f"  {entry.path}  {entry.card['architecture']}  {entry.card['task']['kind']}  "
              f"{len(entry.card['labels'])} labels  val AUROC {_fmt(entry.val_auroc)}")
    for problem in problems:
        print(f"  unreadable: {problem}")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from medai import backup

    command, actor = args.backup_command, "cli"
    if command == "create":
        path = backup.create(actor, args.label, args.include_large)
        print(f"created {path} ({path.stat().st_size / 2**20:.1f} MB, verified)")
        if args.prune:
            for removed in backup.prune(args.keep_last, args.max_age_days, actor):
                print(f"pruned {removed.name}")
    elif command == "list":
        for info in backup.list_backups():
            print(f"{info.name}  {info.size / 2**20:8.1f} MB  {info.files:5d} files  {info.created_at}  "
                  f"by {info.creator}")
    elif command == "verify":
        manifest = backup.verify(backup.resolve(args.name), actor)
        print(f"{args.name}: OK, {len(manifest['files'])} files match their SHA-256")
    elif command == "restore":
        safety = backup.restore(args.name, actor)
        print(f"restored {args.name}; the previous state is in {safety.name}")
    elif command == "delete":
        backup.delete(args.name, actor)
        print(f"deleted {args.name}")
    elif command == "prune":
        removed = backup.prune(args.keep_last, args.max_age_days, actor)
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


COMMANDS = {**cli_train.COMMANDS, "predict": cmd_predict, "explain": cmd_explain,
            "models": cmd_models, "users": cli_users.run, "tokens": cli_users.run_tokens, "serve": cmd_serve,
            "backup": cmd_backup, "doctor": cmd_doctor,
            "anatomy": cli_trust.run, "gate": cli_trust.run_gate, "pacs": cli_pacs.run}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = COMMANDS[args.command]
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
