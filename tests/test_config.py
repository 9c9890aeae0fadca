"""Experiment configs: defaults, one-line errors naming the key, base: inheritance, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlkd.config import Config, load_config
from tlkd.config.loader import validate
from tlkd.errors import ConfigError


def config_error(raw: dict | None = None, overrides: list[str] | None = None) -> ConfigError:
    """The ConfigError that validating ``raw`` (or applying ``overrides``) raises."""
    with pytest.raises(ConfigError) as info:
        if raw is not None:
            validate(raw)
        else:
            load_config(None, overrides or [])
    message = str(info.value)
    assert "\n" not in message, message  # always one line
    return info.value


# --- defaults ---------------------------------------------------------------------------------


def test_no_config_and_empty_file_give_the_defaults(write_config):
    for cfg in (load_config(None), load_config(write_config("", "empty.yaml"))):
        assert isinstance(cfg, Config)
        assert cfg.data.dataset == "digits"
        assert cfg.model.name == "resnet18"
        assert cfg.model.pretrained == "auto"  # hub weights when they can be had
        assert cfg.model.freeze == "none"
        assert cfg.train.epochs == 10
        assert cfg.train.optimizer.name is None  # adamw, or an adapt method's, at start
        assert cfg.train.optimizer.lr is None  # chosen at start (tlkd/data/defaults.py)
        assert cfg.experiment == "exp"


def test_data_train_without_dataset_means_an_image_folder(tmp_path):
    cfg = validate({"data": {"train": str(tmp_path)}})
    assert cfg.data.dataset == "folder"


def test_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = validate(
        {
            "output_dir": "out",
            "model": {"pretrained": "weights/model.safetensors"},
            "data": {"train": "imgs/train", "val": "imgs/val", "root": "~/datasets"},
        }
    )
    assert cfg.output_dir == tmp_path / "out"
    assert cfg.data.train == tmp_path / "imgs" / "train"
    assert cfg.data.val == tmp_path / "imgs" / "val"
    assert cfg.data.root == Path.home() / "datasets"
    assert cfg.model.pretrained == str(tmp_path / "weights" / "model.safetensors")
    # the defaults too
    assert validate({}).output_dir.is_absolute()


def test_teacher_paths_become_absolute_and_booleans_stay(tmp_path, monkeypatch):
    from tlkd.config import resolved_dict

    monkeypatch.chdir(tmp_path)
    one = validate({"teacher": {"name": "t", "pretrained": "runs/teacher"}})
    assert one.teacher.pretrained == str(tmp_path / "runs" / "teacher")
    assert resolved_dict(one)["teacher"]["pretrained"] == str(tmp_path / "runs" / "teacher")
    many = validate(
        {
            "teachers": [
                {"name": "a", "pretrained": "~/weights/a.safetensors"},
                {"name": "b", "pretrained": True},
                {"name": "c", "pretrained": False},
            ],
            "data": {"train": "t", "unlabeled": "u", "cache_dir": "c"},
            "adapt": {"method": "adabn", "source_val": "sv"},
        }
    )
    saved = resolved_dict(many)
    assert [t["pretrained"] for t in saved["teachers"]] == [
        str(Path.home() / "weights" / "a.safetensors"),
        True,
        False,
    ]
    assert saved["data"]["unlabeled"] == str(tmp_path / "u")
    assert saved["data"]["cache_dir"] == str(tmp_path / "c")
    assert saved["adapt"]["source_val"] == str(tmp_path / "sv")
    assert validate({"model": {"pretrained": True}}).model.pretrained is True


# --- unknown keys and wrong values -------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key", "suggestion"),
    [
        ({"train": {"epoch": 3}}, "train.epoch", "epochs"),
        ({"model": {"hed": {"hidden": [8]}}}, "model.hed", "head"),
        ({"modle": {"name": "resnet18"}}, "modle", "model"),
        (
            {"train": {"optimizer": {"weight_decy": 0.1}}},
            "train.optimizer.weight_decy",
            "weight_decay",
        ),
    ],
)
def test_unknown_key_is_one_line_with_did_you_mean(raw, key, suggestion):
    err = config_error(raw)
    assert f"unknown key '{key}'" in str(err)
    assert f"did you mean '{suggestion}'?" in str(err)


@pytest.mark.parametrize(
    ("raw", "key", "suggestion"),
    [
        ({"train": {"lr": 0.1}}, "train.lr", "train.optimizer.lr"),
        ({"lr": 0.1}, "lr", "train.optimizer.lr"),
        ({"epochs": 3}, "epochs", "train.epochs"),
        ({"data": {"hflip": 0.5}}, "data.hflip", "data.augment.hflip"),
        ({"train": {"momentun": 0.9}}, "train.momentun", "train.optimizer.momentum"),
        # the same key further down its own section wins over a merely similar sibling
        ({"train": {"warmup_epochs": 1}}, "train.warmup_epochs", "train.scheduler.warmup_epochs"),
        ({"distill": {"temperature": 2}}, "distill.temperature", "distill.losses.N.temperature"),
    ],
)
def test_unknown_key_suggests_a_key_in_another_section(raw, key, suggestion):
    err = config_error(raw)
    assert f"unknown key '{key}' (did you mean '{suggestion}'?)" in str(err)


def test_override_in_the_wrong_section_suggests_the_full_key():
    err = config_error(overrides=["train.lr=0.1"])
    assert "unknown key 'train.lr' (did you mean 'train.optimizer.lr'?)" in str(err)


def test_unknown_key_without_a_close_match_has_no_suggestion():
    err = config_error({"train": {"zzzzzz": 1}})
    assert "unknown key 'train.zzzzzz'" in str(err)
    assert "did you mean" not in str(err)


@pytest.mark.parametrize(
    ("raw", "key", "shown"),
    [
        ({"train": {"epochs": "three"}}, "train.epochs", "'three'"),
        ({"train": {"optimizer": {"lr": "fast"}}}, "train.optimizer.lr", "'fast'"),
        ({"data": {"image_size": -1}}, "data.image_size", "-1"),
        ({"model": {"head": {"dropout": 1.5}}}, "model.head.dropout", "1.5"),
        ({"train": {"precision": "fp8"}}, "train.precision", "'fp8'"),
        ({"train": 5}, "train", "5"),
    ],
)
def test_wrong_type_names_the_key_and_value(raw, key, shown):
    err = config_error(raw)
    assert err.key == key
    assert str(err).startswith(f"{key}: ")
    assert shown in str(err)


def test_freeze_typo_suggests_backbone():
    err = config_error({"model": {"freeze": "backbon"}})
    assert err.key == "model.freeze"
    assert "did you mean 'backbone'?" in str(err)


def test_unknown_dataset_suggests_the_closest():
    err = config_error({"data": {"dataset": "cifar01"}})
    assert err.key == "data.dataset"
    assert "did you mean 'cifar10'?" in str(err)


def test_samples_per_class_with_fraction_is_an_error():
    err = config_error({"data": {"samples_per_class": 3, "fraction": 0.5}})
    assert "samples_per_class or fraction" in str(err)


def test_unfreeze_after_without_freeze_is_an_error():
    err = config_error({"model": {"unfreeze_after": 1}, "train": {"epochs": 3}})
    assert "unfreeze_after needs model.freeze" in str(err)


def test_unfreeze_after_must_be_below_epochs():
    err = config_error(
        {"model": {"freeze": "backbone", "unfreeze_after": 3}, "train": {"epochs": 3}}
    )
    assert "must be below train.epochs" in str(err)
    validate({"model": {"freeze": "backbone", "unfreeze_after": 2}, "train": {"epochs": 3}})


def test_invalid_yaml_names_file_and_line(write_config):
    path = write_config("experiment: x\ntrain:\n  epochs: 3\n   batch_size: 4\n", "bad.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4: invalid YAML")
    assert "\n" not in message


def test_yaml_that_is_not_a_mapping_is_an_error(write_config):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write_config("- a\n- b\n", "list.yaml"))


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


# --- base: inheritance -------------------------------------------------------------------------


def test_base_deep_merges_child_wins_lists_replaced(tmp_path, write_config):
    write_config(
        {
            "experiment": "parent",
            "model": {"name": "resnet34", "freeze": ["layer1", "layer2"]},
            "data": {"classes": ["a", "b", "c"], "image_size": 64},
            "train": {"epochs": 5, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.01}},
        },
        "shared/base.yaml",
    )
    # a relative base: path is relative to the child's folder, not the working directory
    child = write_config(
        {
            "base": "../shared/base.yaml",
            "experiment": "child",
            "model": {"freeze": ["layer4"]},
            "data": {"classes": ["x", "y"]},
            "train": {"epochs": 2, "optimizer": {"lr": 0.1}},
        },
        "exps/child.yaml",
    )
    cfg = load_config(child)
    assert cfg.experiment == "child"
    assert cfg.model.name == "resnet34"  # inherited
    assert cfg.model.freeze == ["layer4"]  # list replaced, not appended
    assert cfg.data.classes == ["x", "y"]
    assert cfg.data.image_size == 64
    assert cfg.train.epochs == 2
    assert cfg.train.batch_size == 32
    assert cfg.train.optimizer.name == "sgd"  # nested mapping merged key by key
    assert cfg.train.optimizer.lr == pytest.approx(0.1)


def test_base_chain_of_three(write_config):
    write_config({"seed": 1, "train": {"epochs": 1, "batch_size": 2}}, "a.yaml")
    write_config({"base": "a.yaml", "seed": 2, "train": {"epochs": 3}}, "b.yaml")
    c = write_config({"base": "b.yaml", "seed": 3}, "c.yaml")
    cfg = load_config(c)
    assert (cfg.seed, cfg.train.epochs, cfg.train.batch_size) == (3, 3, 2)


def test_overrides_apply_after_base(write_config):
    write_config({"train": {"epochs": 5}}, "base.yaml")
    child = write_config({"base": "base.yaml", "train": {"batch_size": 4}}, "child.yaml")
    cfg = load_config(child, ["train.epochs=7"])
    assert (cfg.train.epochs, cfg.train.batch_size) == (7, 4)


def test_base_cycle_is_an_error(write_config):
    write_config({"base": "b.yaml", "seed": 1}, "a.yaml")
    write_config({"base": "a.yaml", "seed": 2}, "b.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(write_config({"base": "a.yaml"}, "start.yaml"))
    assert info.value.key == "base"
    assert "cycle" in str(info.value)


def test_base_naming_itself_is_a_cycle(write_config):
    with pytest.raises(ConfigError, match="cycle"):
        load_config(write_config({"base": "self.yaml"}, "self.yaml"))


def test_missing_base_file_names_the_child(write_config):
    child = write_config({"base": "gone.yaml"}, "child.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(child)
    assert "gone.yaml" in str(info.value)
    assert "named by base:" in str(info.value)


# --- key.path=value overrides ------------------------------------------------------------------


def test_overrides_are_typed_by_the_schema():
    cfg = load_config(
        None,
        [
            "train.epochs=3",
            "train.optimizer.lr=1e-3",  # YAML reads this as a string; the schema makes it a float
            "train.label_smoothing=0.1",
            "data.classes=[cat,dog]",
            "data.download=true",
            "model.pretrained=false",
            "experiment=123",  # a number where a string is expected stays the name "123"
            "seed=7",
        ],
    )
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.optimizer.lr == pytest.approx(0.001) and isinstance(
        cfg.train.optimizer.lr, float
    )
    assert cfg.train.label_smoothing == pytest.approx(0.1)
    assert cfg.data.classes == ["cat", "dog"]
    assert cfg.data.download is True
    assert cfg.model.pretrained is False
    assert cfg.experiment == "123"
    assert cfg.seed == 7


def test_override_creates_nested_sections():
    cfg = load_config(None, ["model.head.hidden=[16,8]", "model.head.dropout=0.2"])
    assert cfg.model.head is not None
    assert cfg.model.head.hidden == [16, 8]
    assert cfg.model.head.dropout == pytest.approx(0.2)


def test_override_wins_over_the_file(write_config):
    path = write_config({"train": {"epochs": 5, "batch_size": 16}, "model": {"freeze": ["a"]}})
    cfg = load_config(path, ["train.epochs=1", "model.freeze=[b,c]"])
    assert cfg.train.epochs == 1
    assert cfg.train.batch_size == 16
    assert cfg.model.freeze == ["b", "c"]


def test_override_indexes_into_lists(write_config):
    path = write_config({"data": {"classes": ["a", "b", "c"]}})
    assert load_config(path, ["data.classes.1=z"]).data.classes == ["a", "z", "c"]
    with pytest.raises(ConfigError, match="no item 5 in a list of 3"):
        load_config(path, ["data.classes.5=x"])


@pytest.mark.parametrize("text", ["train.epochs", "=3", "train..epochs=3", ".epochs=3"])
def test_malformed_override_is_an_error(text):
    err = config_error(overrides=[text])
    assert "is not of the form key.path=value" in str(err)


def test_override_below_a_value_is_an_error(write_config):
    path = write_config({"train": {"epochs": 5}})
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.epochs.x=3"])
    assert "train.epochs is a value" in str(info.value)


def test_override_of_unknown_key_suggests(write_config):
    err = config_error(overrides=["train.epoch=3"])
    assert "unknown key 'train.epoch'" in str(err) and "'epochs'" in str(err)


def test_override_with_wrong_type_names_the_key():
    err = config_error(overrides=["train.batch_size=many"])
    assert err.key == "train.batch_size"
