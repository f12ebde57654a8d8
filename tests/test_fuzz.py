"""Fuzzing the parts that read untrusted input: image/DICOM decoder, config loader, dataset loaders and
the backup archive reader (the API is fuzzed in test_api.py, and replays the corpus below).

Every example must end in a valid result or in the component's own specific error (never another
exception), within hypothesis' deadline. Runs are derandomized so CI is repeatable; ``make fuzz`` runs
the same properties with many more, random examples (MEDAI_FUZZ_EXAMPLES). Inputs that once broke
something are kept, minimized, in tests/corpus/ and replayed by every run.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from medai import backup
from medai.config import ConfigError, config_from_dict, load_config
from medai.data.datasets import load_records
from medai.errors import DatasetError
from tests import fuzzing as F
from tests.fuzzing import decode_or_specific_error
from tests.conftest import DATA, ROOT

# pydicom warns about every odd value the mutators write; the property is about exceptions, not warnings
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
EXAMPLES = int(os.environ.get("MEDAI_FUZZ_EXAMPLES", "0"))
CORPUS = Path(__file__).parent / "corpus"


def fuzz(default: int, deadline_ms: int = 5000) -> settings:
    """Derandomized and modest by default; random and large under MEDAI_FUZZ_EXAMPLES."""
    return settings(max_examples=EXAMPLES or default, derandomize=not EXAMPLES, deadline=deadline_ms,
                    database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                          HealthCheck.too_slow, HealthCheck.data_too_large])


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------------
# Decoder

SEEDS = F.seeds(DATA) if (DATA / "nih-cxr14-sample").exists() and (DATA / "dicom").exists() else {}
ODD = [0, 1, 2, 7, 8, 12, 15, 16, 17, 32, 255, 256, 65535, 65536, 2**31 - 1, 2**32 - 1, -1, -5, 10**12]
ODD_TEXT = ["", "abc", "nan", "-inf", "1e400", "3\\4", "MONOCHROME1", "RGB", "YBR_FULL_422", "PALETTE COLOR",
            "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2",
            "1.2.840.10008.1.2.4.90", "1.2.3.4.5.6", "\\".join(["1"] * 40), "x" * 2000]


@st.composite
def mutated_image(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = SEEDS[name]
    kinds = ["flip", "truncate", "splice", "header_flip"]
    kinds += {"png": ["ihdr", "chunk", "bomb"], "jpe": ["sof"], "dic": ["element", "element", "private"]}[name[:3]]
    if name in ("dicom_jpeg", "dicom_rle", "dicom_j2k"):  # compressed pixel data: bit flips inside the stream
        kinds += ["pixel_bits", "pixel_bits"]
    kind = draw(st.sampled_from(kinds))
    if kind == "flip":
        n = draw(st.integers(1, 16))
        return F.flip_bytes(data, draw(st.lists(st.integers(0, 2**20), min_size=n, max_size=n)),
                            draw(st.lists(st.integers(0, 255), min_size=n, max_size=n)))
    if kind == "header_flip":  # headers are where parsers make decisions: mutate the first 600 bytes harder
        n = draw(st.integers(1, 6))
        return F.flip_bytes(data, draw(st.lists(st.integers(0, min(len(data), 600) - 1), min_size=n, max_size=n)),
                            draw(st.lists(st.integers(0, 255), min_size=n, max_size=n)))
    if kind == "pixel_bits":
        n = draw(st.sampled_from([1, 8, 64]))
        tail = min(len(data) - 600, 120_000)
        buf = bytearray(data)
        for pos, bit in zip(draw(st.lists(st.integers(len(data) - tail, len(data) - 1), min_size=n, max_size=n)),
                            draw(st.lists(st.integers(0, 7), min_size=n, max_size=n))):
            buf[pos] ^= 1 << bit
        return bytes(buf)
    if kind == "truncate":
        return F.truncate(data, draw(st.floats(0.0, 1.0)))
    if kind == "splice":
        return F.splice(data, draw(st.floats(0.0, 1.0)), draw(st.binary(max_size=256)), draw(st.integers(0, 256)))
    if kind == "ihdr":
        return F.png_header(data, draw(st.sampled_from(ODD + [64, 4096])), draw(st.sampled_from(ODD + [64])),
                            draw(st.sampled_from([0, 1, 2, 4, 8, 16, 3, 32])), draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7])),
                            draw(st.integers(0, 2)))
    if kind == "chunk":
        return F.png_extra_chunk(data, draw(st.sampled_from([b"tEXt", b"zTXt", b"iTXt", b"iCCP", b"eXIf", b"PLTE",
                                                             b"tRNS", b"sBIT", b"gAMA", b"acTL", b"ABCD", b"zzzz"])),
                                 draw(st.binary(max_size=512)))
    if kind == "bomb":
        return F.png_bomb(draw(st.sampled_from([16, 5000, 20000])), draw(st.sampled_from([16, 5000, 20000])))
    if kind == "sof":
        return F.jpeg_frame_size(data, draw(st.sampled_from([0, 1, 15, 64, 4000, 65535])),
                                 draw(st.sampled_from([0, 1, 15, 64, 4000, 65535])))
    if kind == "element":
        field = draw(st.sampled_from(F.DICOM_FIELDS))
        value = draw(st.one_of(st.sampled_from(ODD), st.sampled_from(ODD_TEXT), st.binary(max_size=64)))
        return F.dicom_set(data, field, value)
    return F.dicom_private(data, draw(st.sampled_from([0, 1, 4097, 5_000_000])))


@pytest.mark.skipif(not SEEDS, reason="real data in ../shared/data is absent (a clone without it)")
@fuzz(default=400)
@given(data=mutated_image())
def test_decoder_survives_mutated_real_files(data: bytes):
    decode_or_specific_error(data)


@fuzz(default=150)
@given(data=st.one_of(st.binary(max_size=4096),
                      st.binary(max_size=4096).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
                      st.binary(max_size=4096).map(lambda b: b"\xff\xd8\xff" + b),
                      st.binary(max_size=4096).map(lambda b: b"\0" * 128 + b"DICM" + b)))
def test_decoder_survives_random_bytes_behind_each_signature(data: bytes):
    decode_or_specific_error(data)


@pytest.mark.skipif(not SEEDS, reason="real data in ../shared/data is absent (a clone without it)")
def test_decoder_memory_stays_bounded_on_bombs_and_absurd_headers():
    """Inputs that claim gigapixels are refused from their header; decoding the largest allowed one stays
    within a few times its own size."""
    bomb = F.png_bomb(20_000, 20_000)  # 400 Mpx in 400 KB
    before = rss_mb()
    for width, height in ((40_000, 40_000), (2**31 - 1, 2**31 - 1), (65535, 65535)):
        assert decode_or_specific_error(F.png_header(SEEDS["png8"], width, height, 8, 0)) == "ImageTooLargeError"
        assert decode_or_specific_error(F.jpeg_frame_size(SEEDS["jpeg"], width, height)) in (
            "ImageTooLargeError", "CorruptImageError")
        assert decode_or_specific_error(F.dicom_set(SEEDS["dicom_explicit"], "Rows", min(height, 65535))) in (
            "ImageTooLargeError", "CorruptImageError")
    assert decode_or_specific_error(bomb) == "ImageTooLargeError"
    assert rss_mb() - before < 200, "refusing an absurd header must not allocate its pixels"


# --------------------------------------------------------------------------------------------------
# Regression corpus: every file once broke (or nearly broke) the decoder; each must keep its outcome

def corpus_cases() -> list[tuple[str, str]]:
    expected = json.loads((CORPUS / "expected.json").read_text())
    return sorted(expected["decoder"].items())


@pytest.mark.parametrize("name,outcome", corpus_cases())
def test_decoder_regression_corpus(name: str, outcome: str):
    assert decode_or_specific_error((CORPUS / "decoder" / name).read_bytes()) == outcome


def test_api_answers_every_corpus_file_with_its_status(medai_home: Path):
    """Each corpus file through POST /api/analyze: decodable files are analysed (200), the rest get the
    status of their decoder error as JSON (415 / 413 / 422), never a 5xx."""
    from fastapi.testclient import TestClient

    from medai import auth
    from medai.api import ApiSettings, create_app
    from medai.store import Store

    if not (ROOT / "models" / "pneumonia-hybrid.safetensors").is_file():
        pytest.skip("the shipped pneumonia-hybrid model is absent")
    store = Store()
    auth.create_user(store, "rad1", "correct horse battery", "radiologist")
    token = auth.create_api_token(store, "rad1", "fuzz", actor="admin")[1]
    status = {"ok": 200, "UnsupportedFormatError": 415, "ImageTooLargeError": 413}
    with TestClient(create_app(ApiSettings(rate_per_min=10_000), store=store),
                    raise_server_exceptions=False) as client:
        for name, outcome in corpus_cases():
            resp = client.post("/api/analyze", headers={"Authorization": f"Bearer {token}"},
                               files={"file": (name, (CORPUS / "decoder" / name).read_bytes())})
            assert resp.status_code == status.get(outcome, 422), (name, resp.text[:300])
            assert resp.headers["content-type"].startswith("application/json")
            if outcome != "ok":
                assert resp.json()["error"]["message"], name


def test_corpus_is_small_and_complete():
    files = sorted(p.name for p in (CORPUS / "decoder").iterdir())
    assert files == [name for name, _ in corpus_cases()], "tests/corpus/expected.json and the files disagree"
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    assert total < 512 * 1024, f"the regression corpus is {total / 1024:.0f} KB; minimize it"


# --------------------------------------------------------------------------------------------------
# Config loader

def real_config_trees() -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "configs").glob("*.yaml"))]


CONFIG_TREES = real_config_trees()
def _containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4))


ANY_VALUE = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                                   st.text(max_size=40)), _containers, max_leaves=12)


def key_paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in tree.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out.extend(key_paths(v, prefix + (k,)))
    return out


@fuzz(default=300, deadline_ms=2000)
@given(data=st.data())
def test_config_loader_accepts_or_names_the_bad_key(data: st.DataObject):
    tree = json.loads(json.dumps(data.draw(st.sampled_from(CONFIG_TREES))))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(key_paths(tree)))
        node = tree
        for part in path[:-1]:
            node = node[part]
        if data.draw(st.booleans()):
            node[path[-1]] = data.draw(ANY_VALUE)
        else:
            node[data.draw(st.text(min_size=1, max_size=12))] = data.draw(ANY_VALUE)
    overrides = data.draw(st.lists(st.text(max_size=30), max_size=2))
    try:
        cfg = config_from_dict(tree, overrides)
    except ConfigError as exc:
        assert "config" in str(exc) or "override" in str(exc), str(exc)
        return
    for value in (cfg.train.lr, cfg.train.weight_decay, cfg.preprocess.std, cfg.data.val_fraction):
        assert np.isfinite(value), "a non-finite number must not pass validation"


@fuzz(default=150, deadline_ms=8000)
@given(text=st.one_of(st.text(max_size=400), st.binary(max_size=400).map(lambda b: b.decode("latin-1")),
                      st.sampled_from(["&a [*a]", "a: &a [*a]", "!!python/object:os.system {}", "[" * 5000,
                                       "a: " + "&x " * 3 + "b", "? [a]\n: b", "\t- bad", "{" * 200 + "}" * 200,
                                       "train: !!binary aGVsbG8=", "--- a\n--- b"])))
def test_config_loader_on_arbitrary_yaml_text(tmp_path_factory: pytest.TempPathFactory, text: str):
    path = tmp_path_factory.mktemp("cfg") / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(exc)


# --------------------------------------------------------------------------------------------------
# Dataset loaders (CSV and MedMNIST .npz), which researchers point at arbitrary files

CSV_CELL = st.one_of(st.text(max_size=30), st.sampled_from(["../../etc/passwd", "/dev/zero", "a|b|", "|", "",
                                                            "x" * 300, "\0", '"', "\r\n"]))


@fuzz(default=150, deadline_ms=3000)
@given(header=st.lists(st.sampled_from(["path", "labels", "split", "patient_id", "", "path ", "x"]), min_size=0,
                       max_size=5),
       rows=st.lists(st.lists(CSV_CELL, max_size=6), max_size=8),
       raw=st.one_of(st.none(), st.binary(max_size=300)))
def test_csv_dataset_loader_accepts_or_explains(tmp_path_factory: pytest.TempPathFactory, header, rows, raw):
    import csv

    folder = tmp_path_factory.mktemp("csvset")
    table = folder / "labels.csv"
    if raw is not None:
        table.write_bytes(raw)
    else:
        with open(table, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            csv.writer(fh).writerows([header, *rows])
    from medai.config import DataConfig
    try:
        recset = load_records(DataConfig(root=str(table), format="csv"))
    except DatasetError as exc:
        assert str(exc)
        return
    for r in recset.records:
        assert r.target.shape == (len(recset.labels),) and r.split in (None, "train", "val", "test")


@fuzz(default=80, deadline_ms=3000)
@given(labels=st.one_of(st.lists(st.integers(-3, 12), min_size=1, max_size=20).map(np.array),
                        st.lists(st.floats(allow_nan=True), min_size=1, max_size=8).map(np.array),
                        st.just(np.array([2**40])), st.just(np.zeros((0,))), st.just(np.zeros((3, 0))),
                        st.just(np.array(["a", "b"])), st.just(np.ones((2, 3, 4)))),
       key=st.sampled_from(["train_labels", "val_labels", "labels"]), cut=st.sampled_from([1.0, 1.0, 0.5, 0.01]))
def test_npz_dataset_loader_accepts_or_explains(tmp_path_factory: pytest.TempPathFactory, labels, key, cut):
    folder = tmp_path_factory.mktemp("npzset")
    file = folder / "set.npz"
    n = len(labels) if labels.ndim else 1
    np.savez(file, **{key: labels, key.replace("labels", "images"): np.zeros((n, 28, 28), np.uint8)})
    file.write_bytes(F.truncate(file.read_bytes(), cut))
    from medai.config import DataConfig
    try:
        recset = load_records(DataConfig(root=str(file), format="npz"))
    except DatasetError as exc:
        assert str(exc)
        return
    assert recset.labels and all(r.target.shape == (len(recset.labels),) for r in recset.records)
    assert all(np.isfinite(r.target).all() and set(np.unique(r.target)) <= {0.0, 1.0} for r in recset.records)


# --------------------------------------------------------------------------------------------------
# Backup archive reader: a real backup, then damaged or hostile archives

class Blob(bytes):
    """Bytes that print as their size and hash, so a failing example does not flood the report."""

    def __repr__(self) -> str:
        import hashlib
        return f"<{len(self)} bytes, sha256 {hashlib.sha256(self).hexdigest()[:16]}>"


@pytest.fixture(scope="module")
def real_backup(tmp_path_factory: pytest.TempPathFactory) -> Blob:
    home = tmp_path_factory.mktemp("backup-home")
    old = os.environ.get("MEDAI_HOME")
    os.environ["MEDAI_HOME"] = str(home)
    try:
        from medai.store import Store
        (home / "models").mkdir()
        (home / "models" / "tiny.safetensors").write_bytes(os.urandom(2048))
        (home / "configs").mkdir()
        shutil.copy(ROOT / "configs" / "hybrid_pneumonia.yaml", home / "configs")
        Store(home / "store" / "medai.db").audit("admin", "login_ok")  # a row to back up
        return Blob(backup.create("admin", label="seed").read_bytes())
    finally:
        os.environ["MEDAI_HOME"] = old or ""


def tree_digest(root: Path) -> dict[str, bytes]:
    """Every file of an installation except backups/ (a refused restore may leave its pre-restore backup)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != "backups"}


def rewrite_archive(original: bytes, edit) -> bytes:
    """Unpack the archive's members, let ``edit`` change the list, pack them again (gzip, like ours)."""
    members = []
    with tarfile.open(fileobj=io.BytesIO(original), mode="r:gz") as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read() if m.isfile() else None))
    members = edit(members)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for m, body in members:
            if body is not None:
                m.size = len(body)
            tar.addfile(m, io.BytesIO(body) if body is not None else None)
    return out.getvalue()


def hostile_member(kind: str, name: str) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
    elif kind == "device":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    elif kind == "fifo":
        info.type = tarfile.FIFOTYPE
    else:
        return info, b"planted"
    return info, None


MEMBER_NAMES = st.sampled_from(["../escaped.txt", "/tmp/medai-fuzz-abs.txt", "models/../../escaped.txt",
                                "models/tiny.safetensors", "manifest.json", "store/medai.db", "configs/x.yaml",
                                "models/sub/../../../escaped.txt", "results/" + "a" * 300, "models/\0.txt"])


@st.composite
def hostile_archive(draw: st.DrawFn, original: bytes) -> bytes:
    kind = draw(st.sampled_from(["bytes", "truncate", "member", "manifest", "drop"]))
    if kind == "bytes":
        n = draw(st.integers(1, 8))
        return F.flip_bytes(original, draw(st.lists(st.integers(0, len(original) - 1), min_size=n, max_size=n)),
                            draw(st.lists(st.integers(0, 255), min_size=n, max_size=n)))
    if kind == "truncate":
        return F.truncate(original, draw(st.floats(0.0, 0.999)))
    if kind == "member":
        extra = hostile_member(draw(st.sampled_from(["file", "symlink", "hardlink", "device", "fifo"])),
                               draw(MEMBER_NAMES))
        return rewrite_archive(original, lambda ms: ms + [extra] if draw(st.booleans()) else [extra] + ms)
    if kind == "drop":
        return rewrite_archive(original, lambda ms: [m for m in ms if m[0].name != draw(st.sampled_from(
            [x[0].name for x in ms]))])

    def edit_manifest(members):
        out = []
        for m, body in members:
            if m.name == backup.MANIFEST:
                doc = json.loads(body)
                key = draw(st.sampled_from(sorted(doc) + ["files", "files", "extra"]))
                if key == "files" and isinstance(doc.get("files"), list) and doc["files"] and draw(st.booleans()):
                    entry = doc["files"][draw(st.integers(0, len(doc["files"]) - 1))]
                    if isinstance(entry, dict) and entry:
                        entry[draw(st.sampled_from(sorted(entry)))] = draw(ANY_VALUE | MEMBER_NAMES)
                else:
                    doc[key] = draw(ANY_VALUE)
                body = draw(st.sampled_from([json.dumps(doc).encode(), json.dumps(doc).encode()[:-3], b"[]",
                                             b"\xff\xfe"]))
            out.append((m, body))
        return out
    return rewrite_archive(original, edit_manifest)


@fuzz(default=60, deadline_ms=20000)
@given(data=st.data())
def test_backup_reader_refuses_damaged_or_hostile_archives_and_restores_nothing_partial(
        data: st.DataObject, real_backup: bytes, medai_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """verify() and restore() on a mutated archive: a BackupError (or success, for a harmless change), no
    file written outside the installation, and after a refusal the installation is exactly as before."""
    archive = data.draw(hostile_archive(real_backup).map(Blob))
    home = tmp_path_factory.mktemp("restore-home")
    os.environ["MEDAI_HOME"] = str(home)
    try:
        (home / "models").mkdir()
        (home / "models" / "keep.safetensors").write_bytes(b"existing model")
        target = backup.backups_dir() / "medai-backup-20260101-000000-fuzz.tar.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(archive)
        before = tree_digest(home)
        try:
            backup.verify(target)
            backup.restore(target, actor="admin")
        except backup.BackupError as exc:
            assert str(exc)
            assert tree_digest(home) == before, "a refused restore changed the installation"
        assert not (home.parent / "escaped.txt").exists() and not Path("/tmp/medai-fuzz-abs.txt").exists()
    finally:
        os.environ["MEDAI_HOME"] = str(medai_home)
