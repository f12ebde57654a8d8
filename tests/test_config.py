"""Strict configuration loading: unknown keys and wrong types are refused with the key named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medai.config import config_from_dict, load_config
from medai.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_every_shipped_config_loads():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(configs) >= 9
    names = {load_config(c).model.name for c in configs}
    assert {"hybrid_cnn_transformer", "densenet121"} <= names and any(n.startswith("vit_") for n in names)


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs/hybrid_pneumonia.yaml", ["train.lr=1e-4", "train.epochs=2",
                                                               "data.labels=[NORMAL]", "train.grad_clip=null"])
    assert cfg.train.lr == 1e-4 and cfg.train.epochs == 2 and cfg.data.labels == ["NORMAL"]
    assert cfg.train.grad_clip is None
    assert load_config(ROOT / "configs/hybrid_pneumonia.yaml", ["train.amp=off"]).train.amp == "off"  # not False


@pytest.mark.parametrize("tree, overrides, key", [
    ({"data": {"root": "x"}, "train": {"lrr": 1}}, [], "train.lrr"),
    ({"data": {"root": "x"}}, ["train.epochs=ten"], "train.epochs"),
    ({"data": {"root": "x"}}, ["train.amp=fp8"], "train.amp"),
    ({"data": {"root": "x"}, "model": {"name": 3}}, [], "model.name"),
    ({"data": {"root": "x"}, "train": {"epochs": 0}}, [], "train.epochs"),
    ({"data": {"root": "x"}, "preprocess": {"image_size": True}}, [], "preprocess.image_size"),
    ({"data": {"root": "x"}, "bogus": 1}, [], "bogus"),
    ({"data": {}}, [], "data.root"),
    ({"data": {"root": "x"}, "model": {"cam_method": "blurcam"}}, [], "model.cam_method"),
    ({"data": {"root": "x", "extra_train": [{"root": "y", "labels": {"A": "b"}}]}}, [], "data.extra_train[0].labels"),
    ({"data": {"root": "x", "extra_train": [{"root": "y", "labels": {}}]}}, [], "data.extra_train[0].labels"),
    ({"data": {"root": "x", "extra_train": [{"labels": {"A": ["b"]}}]}}, [], "data.extra_train[0].root"),
    ({"data": {"root": "x", "extra_train": [{"root": "y", "labels": {"A": ["b"]}, "per_label": 0}]}}, [],
     "data.extra_train[0].per_label"),
    ({"data": {"root": "x", "extra_train": [{"root": "y", "label": {"A": ["b"]}}]}}, [], "data.extra_train[0].label"),
])
def test_bad_configs_name_the_key(tree, overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        config_from_dict(tree, overrides)


def test_bad_yaml_and_missing_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_the_heatmap_methods_a_config_may_name_are_the_ones_that_exist():
    from medai.config import ATTENTION_CAM_METHODS, CAM_METHOD_NAMES
    from medai.explain.cam import CAM_METHODS

    assert set(CAM_METHOD_NAMES) == set(CAM_METHODS) and set(ATTENTION_CAM_METHODS) < set(CAM_METHODS)
