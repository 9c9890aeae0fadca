"""Property-based: whatever YAML a user writes, tlkd either accepts it or answers with one clean
error line (exit code 2 from the CLI) - never a traceback."""

import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlkd.config.loader import apply_override, read_yaml, validate
from tlkd.config.schema import Config
from tlkd.errors import ConfigError

VALID = {
    "experiment": "fuzz",
    "seed": 1,
    "model": {"name": "test_resnet", "freeze": "none", "head": {"hidden": [8], "dropout": 0.1}},
    "data": {"dataset": "digits", "image_size": 16, "samples_per_class": 2, "num_workers": 0},
    "train": {
        "epochs": 1,
        "batch_size": 4,
        "optimizer": {"name": "adamw", "lr": 0.01},
        "scheduler": {"name": "none"},
        "device": "cpu",
    },
    "teacher": None,
    "distill": {"losses": [{"type": "kd", "temperature": 2}, {"type": "ce"}]},
}
KEYS = sorted(
    {
        "experiment",
        "seed",
        "model",
        "data",
        "train",
        "name",
        "lr",
        "epochs",
        "freeze",
        "head",
        "hidden",
        "dropout",
        "dataset",
        "image_size",
        "classes",
        "losses",
        "type",
        "weight",
        "temperature",
        "teacher",
        "teachers",
        "optimizer",
        "scheduler",
        "augment",
        "scale",
        "pretrained",
        "base",
        "kwargs",
        "tasks",
        "val_every",
        "bogus",
        "epoch",
        "nme",
        "",
    }
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["none", "backbone", "kd", "cosine", "resnet18", "."]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(data, prefix=()):
    if isinstance(data, dict):
        for k, v in data.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated(draw):
    """The valid config with one to three random edits: a value replaced, a key renamed or
    deleted, or a new key added somewhere."""
    data = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        path = draw(st.sampled_from(paths))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        action = draw(st.sampled_from(["replace", "rename", "delete", "add"]))
        if action == "replace":
            parent[last] = draw(values)
        elif isinstance(parent, dict) and action == "rename":
            parent[draw(st.sampled_from(KEYS))] = parent.pop(last)
        elif isinstance(parent, dict) and action == "delete":
            parent.pop(last)
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS))] = draw(values)
    return data


def _one_clean_line(err: ConfigError) -> None:
    text = str(err)
    assert text and "\n" not in text and "Traceback (most recent call last)" not in text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated(), st.dictionaries(st.sampled_from(KEYS), values, max_size=5)))
def test_any_config_validates_or_fails_cleanly(data):
    try:
        cfg = validate(data)
    except ConfigError as err:
        _one_clean_line(err)
    else:
        assert isinstance(cfg, Config)
        # a valid config's resolved form is valid too (what a run directory saves)
        validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_any_yaml_text_reads_or_fails_cleanly(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        validate(read_yaml(path))
    except ConfigError as err:
        _one_clean_line(err)


def test_unknown_keys_that_look_like_type_names_are_named():
    """Found by the fuzz test below: a key such as '[' or 'int' was taken for pydantic's
    union-member tag and dropped, and naming the unknown key crashed."""
    for text, key in [("[=", "["), ("int=1", "int"), ("data.list[x]=1", "data.list[x]")]:
        raw = copy.deepcopy(VALID)
        apply_override(raw, text)
        try:
            validate(raw)
        except ConfigError as err:
            assert str(err).startswith(f"unknown key '{key}'"), str(err)
        else:
            raise AssertionError(f"{text!r} validated")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_override_applies_or_fails_cleanly(text):
    raw = copy.deepcopy(VALID)
    try:
        apply_override(raw, text)
        validate(raw)
    except ConfigError as err:
        _one_clean_line(err)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(mutated())
def test_cli_dry_run_plans_or_exits_2_with_one_line(tmp_path, cli, data):
    data.pop("teacher", None)
    data.pop("distill", None)  # finetune: no teachers
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    result = cli("finetune", path, "--dry-run")
    if result.exit_code == 0:
        assert "dry run: nothing trained" in result.output
    else:
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
