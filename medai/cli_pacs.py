"""``python -m medai pacs {listen,studies,analyze,queue}``: the DICOM node, DICOMweb query and
retrieve, and the node's work queue. Settings come from the command line, else from what admins set on the
PACS page (:mod:`medai.pacs.settings`), else the defaults."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from medai.errors import MedaiError

log = logging.getLogger("medai.pacs")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pacs", help="the DICOM node: receive from the PACS, analyse, send results back")
    psub = p.add_subparsers(dest="pacs_command", required=True)
    listen = psub.add_parser("listen", help="C-ECHO / C-STORE SCP that analyses chest CR/DX and sends results")
    listen.add_argument("--ae-title")
    listen.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    listen.add_argument("--port", type=int)
    for q in (listen, psub.add_parser("analyze", help="fetch a study (WADO-RS), analyse it, send results back")):
        q.add_argument("--model", help="model name from `medai models` or a checkpoint path (default: the default chest model)")
        q.add_argument("--dest-ae", help="destination AE title for results (C-STORE)")
        q.add_argument("--dest-host")
        q.add_argument("--dest-port", type=int)
        q.add_argument("--stow-url", help="DICOMweb root to STOW-RS results to (instead of or besides C-STORE)")
        q.add_argument("--url", dest="dicomweb_url", help="DICOMweb root of the PACS (QIDO/WADO)")
    psub.choices["analyze"].add_argument("study_uid")
    st = psub.add_parser("studies", help="QIDO-RS: recent studies and their AI status")
    st.add_argument("--url", dest="dicomweb_url")
    st.add_argument("--since", default="2d", help="2d, 12h, 1w or YYYYMMDD")
    st.add_argument("--modality", help="e.g. DX or CR")
    st.add_argument("--json", action="store_true")
    qu = psub.add_parser("queue", help="the node's work queue (newest first)")
    qu.add_argument("--priority", action="store_true", help="most urgent first")
    qu.add_argument("--json", action="store_true")
    pr = psub.add_parser("prune", help="retention: delete the files of items finished more than N days ago "
                         "(the worklist, History and audit rows stay)")
    pr.add_argument("--older-than-days", type=float, required=True)
    pr.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")


def _predictor(model: str | None) -> tuple[Any, str]:
    from medai.catalog import default_index, list_models
    from medai.inference import Predictor

    if model and Path(model).is_file():
        return Predictor(model), Path(model).stem
    entries = list_models()[0]
    if not entries:
        raise MedaiError("no model is installed; ship or train one first")
    chosen = next((e for e in entries if e.name == model), None) if model else entries[default_index(entries)]
    if chosen is None:
        raise MedaiError(f"no model named {model!r}; `python -m medai models` lists them")
    return Predictor(chosen.path), chosen.name


def _node(cfg: dict[str, Any]):
    from medai.pacs.node import Node
    from medai.pacs.work import Endpoint

    predictor, name = _predictor(cfg["model"])
    from medai.pacs.settings import dicomweb_auth

    dest = Endpoint(ae_title=cfg["dest_ae"], host=cfg["dest_host"], port=int(cfg["dest_port"] or 0),
                    stow_url=cfg["stow_url"], calling_ae=cfg["ae_title"], auth=dicomweb_auth(cfg))
    return Node(predictor, name, cfg["ae_title"], cfg["host"], int(cfg["port"]), dest)


def cmd_listen(cfg: dict[str, Any]) -> int:
    logging.getLogger("medai").setLevel(logging.INFO)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    node = _node(cfg).start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if not node.destination.configured:
        log.warning("no destination configured (--dest-ae/--dest-host/--dest-port or --stow-url): results stay "
                    "in the outbox until one is")
    stop.wait()
    node.stop()
    return 0


def cmd_analyze(cfg: dict[str, Any], study_uid: str) -> int:
    from medai.pacs import network, queue, work
    from medai.pacs.settings import dicomweb_auth

    if not cfg["dicomweb_url"]:
        raise MedaiError("pacs analyze needs the PACS's DICOMweb root (--url or the settings page)")
    node = _node(cfg)
    states = [work.receive(node.store, raw, node.predictor, node.model_name)[0]
              for raw in network.retrieve_study(cfg["dicomweb_url"], study_uid, **dicomweb_auth(cfg))]
    node.drain()
    rows = [r for r in queue.items(node.store) if r["study_uid"] == study_uid]
    print(f"study {study_uid}: {len(states)} instance(s) fetched; "
          + ", ".join(f"{r['sop_uid']}: {r['state']}{' (' + r['reason'] + ')' if r['reason'] else ''}" for r in rows))
    return 0 if all(r["state"] in (queue.SENT, queue.SKIPPED, queue.DONE) for r in rows) else 1


def cmd_studies(cfg: dict[str, Any], args: argparse.Namespace) -> int:
    from medai.pacs import network, queue
    from medai.pacs.settings import dicomweb_auth
    from medai.store import Store

    if not cfg["dicomweb_url"]:
        raise MedaiError("pacs studies needs the PACS's DICOMweb root (--url or the settings page)")
    status: dict[str, list[str]] = {}
    for row in queue.items(Store()):
        status.setdefault(row["study_uid"], []).append(row["state"])
    studies = network.search_studies(cfg["dicomweb_url"], args.since, args.modality, **dicomweb_auth(cfg))
    for study in studies:
        study["ai_status"] = ", ".join(sorted(set(status.get(study["study_uid"], [])))) or "not received"
    if args.json:
        print(json.dumps(studies, indent=2))
    for s in [] if args.json else studies:
        print(f"{s['date']}  {','.join(s['modalities']):<6} {s['study_uid']}  {s['ai_status']}")
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    from medai.pacs import queue
    from medai.store import Store, local_time

    rows = queue.items(Store(), by_priority=args.priority)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for r in rows:
        print(f"{local_time(r['received_at'])}  {r['state']:<9} {r['modality']:<3} {r['sop_uid']}  "
              f"{', '.join(r['findings']) or '-'}  {r['reason']}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from medai.errors import ConfigError
    from medai.pacs.work import prune
    from medai.store import Store

    if args.older_than_days < 0:
        raise ConfigError("--older-than-days must be 0 or more")
    items, freed = prune(Store(), args.older_than_days * 86400, dry_run=args.dry_run)
    verb = "would free" if args.dry_run else "freed"
    print(f"{items} finished item(s) older than {args.older_than_days:g} days: {verb} {freed / 2**20:.1f} MB")
    return 0


def run(args: argparse.Namespace) -> int:
    from medai.pacs.settings import load

    cfg = load(overrides=vars(args))
    if args.pacs_command == "listen":
        return cmd_listen(cfg)
    if args.pacs_command == "analyze":
        return cmd_analyze(cfg, args.study_uid)
    if args.pacs_command == "studies":
        return cmd_studies(cfg, args)
    if args.pacs_command == "prune":
        return cmd_prune(args)
    return cmd_queue(args)
