"""The Train page: a launch form in the sidebar, the job list, and live curves of the selected run."""

from __future__ import annotations

import datetime as dt

import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from medai.config import DataConfig, load_config
from medai.data.mixing import label_sources
from medai.errors import MedaiError
from medai.models.pretrained import weight_source
from medai.models.registry import architectures
from medai.paths import PROJECT_ROOT, data_dir, medai_home
from medai.store import User
from medai import jobs, runs
from medai.ui.session import session_expired

REFRESH_S = 2.0


def datasets() -> list[str]:
    """Dataset folders and files under MEDAI_DATA_DIR and $MEDAI_HOME/data (relative names first)."""
    found = []
    for root in (data_dir(), medai_home() / "data"):
        if root.is_dir():
            for p in sorted(root.iterdir()):
                if p.name.startswith(".") or p.name == "cache" or p.suffix in (".db", ".md", ".db-wal", ".db-shm"):
                    continue
                if p.is_dir() or p.suffix in (".npz", ".csv"):
                    found.append(p.name if root == data_dir() else str(p))
    return found


@st.cache_data(show_spinner="Counting images...", max_entries=32)
def dataset_summary(root: str, patient_regex: str | None, _mtime: float) -> dict:
    from medai.data.datasets import load_records

    return load_records(DataConfig(root=root, patient_regex=patient_regex)).summary()


def _mtime(root: str) -> float:
    from medai.paths import resolve_data_path

    try:
        return resolve_data_path(root).stat().st_mtime
    except OSError:
        return 0.0


def _overrides(cfg, form: dict) -> list[str]:
    sets = [f"data.root={form['dataset']}", f"model.name={form['architecture']}",
            f"preprocess.image_size={form['image_size']}", f"train.epochs={form['epochs']}",
            f"train.batch_size={form['batch_size']}", f"train.lr={form['lr']}", f"train.amp={form['amp']}",
            f"train.early_stopping_patience={form['patience']}", f"train.head_epochs={form['head_epochs']}",
            f"augment.enabled={str(form['augment']).lower()}", f"train.seed={form['seed']}",
            f"name={form['name']}", f"train.nproc_per_node={form['nproc']}",
            f"train.lr_scaling={form['lr_scaling']}", f"train.ema_decay={form['ema_decay']}",
            f"train.ema_ramp={form['ema_ramp']}", f"train.patient_balance={form['patient_balance']}",
            f"train.attention_loss={form['attention_loss']}", f"train.keep_epochs={str(form['keep_epochs']).lower()}"]
    if form["dataset"] != cfg.data.root:  # another dataset: the recipe's own split/labels do not apply
        sets += ["data.patient_regex=null", "data.eval_root=null", "data.labels=null", "data.extra_train=[]"]
    if form["pretrained"].strip():
        sets.append(f"model.pretrained={form['pretrained'].strip()}")
        named = weight_source(form["pretrained"].strip())
        if named:  # the normalisation the weights were trained with
            sets += [f"preprocess.{key}={value}" for key, value in named.preprocessing.items()]
    return sets


def _starting_weights(key: str) -> str:
    """Fine-tune from ImageNet weights a package ships or a checkpoint the catalog knows (shipped,
    installed or a finished run), never from a typed server path: nothing typed here can make the server
    read files outside those folders."""
    from medai.catalog import starting_weights

    options = starting_weights()
    choice = st.selectbox("Starting weights", list(options), key=f"pre_{key}",
                          help="Initialise from ImageNet weights (EfficientNet-Lite architectures and the hybrid "
                               "with an EfficientNet-Lite backbone) or a trained checkpoint's weights where their "
                               "shapes match (the head is re-initialised when the labels differ).")
    return options[choice]


def _parallel_inputs(cfg, key: str, gpus: int) -> dict:
    """GPUs to train on (data-parallel under torchrun) and the learning-rate rule for the larger batch;
    fixed at 1 where this machine has fewer than two GPUs."""
    if gpus < 2:
        st.number_input("GPUs (processes)", 1, 1, 1, disabled=True, key=f"nproc_{key}",
                        help="Data-parallel training needs two or more GPUs; this machine trains on one "
                             "process.")
        return {"nproc": 1, "lr_scaling": cfg.train.lr_scaling}
    nproc = st.number_input("GPUs (processes)", 1, gpus, min(max(cfg.train.nproc_per_node, 1), gpus),
                            key=f"nproc_{key}", help="One torchrun process per GPU; the batch size above is per "
                                                     "GPU, so the effective batch is batch size x GPUs.")
    rules = ["none", "linear", "sqrt"]
    scaling = st.selectbox("Learning rate for the effective batch", rules, rules.index(cfg.train.lr_scaling),
                           key=f"lrs_{key}", help="none: the rate above; linear: x GPUs; sqrt: x sqrt(GPUs)")
    return {"nproc": int(nproc), "lr_scaling": scaling}


def _averaging_sampling_attention(cfg, key: str) -> dict:
    """The weight-average decay and warm-up, patient-balanced sampling and the anatomy-guided attention weight
    (0 = off for each), and whether to keep every epoch's weights."""
    return {
        "ema_decay": st.number_input("Weight average (EMA) decay", 0.0, 0.9999, cfg.train.ema_decay,
                                     0.001, format="%.4f", key=f"ema_{key}",
                                     help="0 = off. The average of the weights over the last steps "
                                          "(e.g. 0.998) is validated and kept as the best model"),
        "ema_ramp": st.number_input("Weight average warm-up (ramp)", 0.1, 100.0, float(cfg.train.ema_ramp), 1.0,
                                    key=f"ramp_{key}",
                                    help="The average's window grows by one step every this many updates "
                                         "until it reaches 1 / (1 - decay): 9 is TensorFlow's warm-up (0.998 "
                                         "after 4,490 updates), 1 a running mean until then (498 updates)"),
        "patient_balance": st.number_input("Patient balance", 0.0, 1.0, float(cfg.train.patient_balance), 0.25,
                                           key=f"balance_{key}",
                                           help="Draw each film with probability n^-balance, n = its patient's "
                                                "film count: 0 = every film equally, 1 = every patient equally. "
                                                "On NIH-14, 0.5 scored 0.04 lower on the one-film-per-patient "
                                                "sample (README)"),
        "attention_loss": st.number_input("Anatomy-guided attention (loss weight)", 0.0, 100.0,
                                          cfg.train.attention_loss, 0.1, key=f"att_{key}",
                                          help="0 = off. Adds this weight x the share of each class's "
                                               "Grad-CAM outside the learned lungs and heart (chest "
                                               "films), so heatmaps stay on the chest; about 2x the "
                                               "step time"),
        "keep_epochs": st.checkbox("Keep every epoch's weights", cfg.train.keep_epochs, key=f"keep_{key}",
                                   help="Besides the best by validation AUROC, so that `medai ship --epoch N` "
                                        "can ship another (e.g. a later epoch of anatomy-guided training)"),
    }


def _extra_train_text(cfg) -> str:
    """What the recipe adds to training from other sets (``data.extra_train``); another dataset drops it."""
    parts = [f"{e.root} ({e.split} split, {f'at most {e.per_label}' if e.per_label else 'all'} per label: "
             f"{label_sources(e.labels)})" for e in cfg.data.extra_train]
    return "Training also draws films from " + "; ".join(parts) + ". Validation is this dataset's alone."


def _launch_form(user: User) -> None:
    import torch

    recipes = sorted((PROJECT_ROOT / "configs").glob("*.yaml"))
    with st.sidebar:
        st.header("New training run")
        recipe = st.selectbox("Recipe (defaults)", recipes, format_func=lambda p: p.stem, key="train_recipe")
        cfg = load_config(recipe)
        names = datasets()
        arches = architectures()
        key = recipe.stem
        with st.form("launch"):
            form = {
                "name": st.text_input("Run name", value=cfg.name, key=f"name_{key}"),
                "dataset": st.selectbox("Dataset", names, index=names.index(cfg.data.root) if cfg.data.root in names
                                        else 0, key=f"ds_{key}"),
                "architecture": st.selectbox("Architecture", arches, index=arches.index(cfg.model.name),
                                             key=f"arch_{key}"),
                "image_size": st.number_input("Image size (px)", 16, 1024, cfg.preprocess.image_size, 16,
                                              key=f"size_{key}"),
                "epochs": st.number_input("Epochs", 1, 500, cfg.train.epochs, key=f"epochs_{key}"),
                "batch_size": st.number_input("Batch size", 1, 1024, cfg.train.batch_size, key=f"bs_{key}"),
                "lr": st.text_input("Learning rate", value=f"{cfg.train.lr:g}", key=f"lr_{key}"),
                "amp": st.selectbox("Mixed precision", ["auto", "fp16", "bf16", "off"] if torch.cuda.is_available()
                                    else ["off", "bf16"], key=f"amp_{key}",
                                    help="fp16/auto need a GPU; bf16 autocast also runs on CPU"),
                "patience": st.number_input("Early-stopping patience (epochs)", 0, 100,
                                            cfg.train.early_stopping_patience or 0, key=f"pat_{key}"),
                "head_epochs": st.number_input("Two-stage: head-only epochs first", 0, 100, cfg.train.head_epochs,
                                               key=f"head_{key}"),
                **_averaging_sampling_attention(cfg, key),
                "augment": st.checkbox("Augmentation", value=cfg.augment.enabled, key=f"aug_{key}"),
                "seed": st.number_input("Seed", 0, 2**31 - 1, cfg.train.seed, key=f"seed_{key}"),
                "pretrained": _starting_weights(key),
                **_parallel_inputs(cfg, key, torch.cuda.device_count()),
            }
            submitted = st.form_submit_button("Start training", type="primary")
        summary_box = st.expander("Dataset counts")
        if cfg.data.extra_train and form["dataset"] == cfg.data.root:
            summary_box.caption(_extra_train_text(cfg))
        try:
            summary = dataset_summary(form["dataset"], cfg.data.patient_regex if form["dataset"] == cfg.data.root
                                      else None, _mtime(form["dataset"]))
            summary_box.dataframe([{"split": s, "images": v["images"], "patients": v["patients"], **v["per_label"]}
                                   for s, v in summary["splits"].items()], hide_index=True)
        except MedaiError as exc:
            summary_box.warning(str(exc))
    if submitted:
        try:
            job = jobs.submit(load_config(recipe, _overrides(cfg, form)), user.username)
        except MedaiError as exc:
            st.sidebar.error(f"Not started: {exc}")
            return
        st.session_state["train_selected"] = job.run_id
        st.sidebar.success(f"Started {job.run_id} ({job.state}).")


def curves(records: list[dict]) -> go.Figure:
    epochs = [r for r in records if r.get("type") == "epoch"]
    steps = [r for r in records if r.get("type") == "step"]
    fig = make_subplots(rows=2, cols=2, subplot_titles=("loss", "validation AUROC / mAP", "learning rate",
                                                        "images/s"))
    x = [r["epoch"] + 1 for r in epochs]
    fig.add_scatter(x=x, y=[r["train_loss"] for r in epochs], name="train loss", row=1, col=1)
    fig.add_scatter(x=x, y=[r["val_loss"] for r in epochs], name="val loss", row=1, col=1)
    fig.add_scatter(x=x, y=[r["val_auroc"] for r in epochs], name="val AUROC", row=1, col=2)
    fig.add_scatter(x=x, y=[r["val_map"] for r in epochs], name="val mAP", row=1, col=2)
    outside = [r for r in epochs if "train_cam_outside" in r]  # train.attention_loss runs
    if outside:
        fig.add_scatter(x=[r["epoch"] + 1 for r in outside], y=[r["train_cam_outside"] for r in outside],
                        name="Grad-CAM share outside the chest (train)", row=1, col=2)
    fig.add_scatter(x=[r["step"] for r in steps], y=[r["lr"] for r in steps], name="lr", row=2, col=1)
    fig.add_scatter(x=[r["step"] for r in steps], y=[r["images_per_s"] for r in steps], name="images/s", row=2, col=2)
    fig.update_xaxes(title_text="epoch", row=1)
    fig.update_xaxes(title_text="step", row=2)
    fig.update_layout(height=560, margin={"l": 10, "r": 10, "t": 40, "b": 10}, legend={"orientation": "h"})
    return fig


def _controls(job: jobs.Job, user: User) -> None:
    c1, c2, c3 = st.columns([1, 1, 2])
    try:
        if job.state in runs.ACTIVE_STATES and c1.button("Cancel", key=f"cancel_{job.run_id}"):
            jobs.cancel(job.run_id, user.username)
            st.rerun()
        if job.state in runs.RESUMABLE_STATES and c2.button("Resume", key=f"resume_{job.run_id}"):
            jobs.resume(job.run_id, user.username)
            st.rerun()
        if job.status.get("state") == runs.FINISHED and not job.registered_as:
            with c3.form(f"register_{job.run_id}"):
                name = st.text_input("Model name", value=job.run_id.rsplit("-", 3)[0])
                if st.form_submit_button("Register as model"):
                    jobs.register(job.run_id, name, user.username)
                    st.session_state["train_flash"] = (f"Registered {job.run_id} as {name}; it is now "
                                                       "selectable on Analyze and Metrics.")
                    st.rerun(scope="app")  # the run table's model column too
        elif job.registered_as:
            c3.caption(f"Registered as model **{job.registered_as}**")
    except MedaiError as exc:
        st.error(str(exc))


@st.fragment(run_every=REFRESH_S)
def _run_panel(run_id: str, user: User) -> None:
    if session_expired():  # the timer keeps running; the idle timeout must still apply
        st.rerun(scope="app")
    jobs.refresh()
    job = jobs.get_job(run_id)
    status = job.status
    st.subheader(run_id)
    best = status.get("best_val_auroc")
    cols = st.columns(4)
    cols[0].metric("state", job.state)
    cols[1].metric("epoch", f"{(status.get('epoch') or 0) + (job.state == runs.FINISHED)}/{status.get('epochs', '?')}")
    cols[2].metric("best val AUROC", f"{best:.4f}" if isinstance(best, float) else "-")
    eta = status.get("eta_s")
    cols[3].metric("ETA", f"{eta / 60:.1f} min" if job.state == runs.RUNNING and eta else "-")
    st.progress(job.progress)
    if status.get("message"):
        st.caption(status["message"])
    if (status.get("world_size") or 1) > 1:
        st.caption(f"Data-parallel on {status['world_size']} processes ({status.get('device')}); images/s "
                   "counts all of them.")
    _controls(job, user)
    st.plotly_chart(curves(runs.read_progress(job.run_dir)), key=f"curves_{run_id}")
    with st.expander("Log", expanded=job.state == runs.FAILED):
        st.code(status.get("log_tail") or jobs.log_tail(job.run_dir) or "(empty)")


def job_rows(job_list: list[jobs.Job]) -> list[dict]:
    return [{"run": j.run_id, "state": j.state, "by": j.username,
             "progress": round(100 * (1.0 if j.status.get("state") == runs.FINISHED else j.progress)),
             "best val AUROC": j.status.get("best_val_auroc"),
             "started": dt.datetime.fromtimestamp(j.created_at).strftime("%Y-%m-%d %H:%M"),
             "model": j.registered_as or ""} for j in job_list]


@st.fragment(run_every=REFRESH_S)
def _run_table() -> None:
    """The run list, refreshed with the run panel (it said 'running, 0%' after the panel said finished)."""
    jobs.refresh()
    st.dataframe(job_rows(jobs.list_jobs()), hide_index=True, column_config={
        "progress": st.column_config.ProgressColumn("progress", min_value=0, max_value=100, format="%d%%")})


def render_train(user: User) -> None:
    st.title("Train")
    _launch_form(user)
    if "train_flash" in st.session_state:
        st.success(st.session_state.pop("train_flash"))
    job_list = jobs.list_jobs()
    if not job_list:
        st.info("No training runs yet: start one from the sidebar.")
        return
    _run_table()
    ids = [j.run_id for j in job_list]
    selected = st.session_state.get("train_selected")
    run_id = st.selectbox("Run", ids, index=ids.index(selected) if selected in ids else 0, key="train_run")
    _run_panel(run_id, user)
