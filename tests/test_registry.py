"""The plug-in registries: every entry loads, the schema's choices and keys come from the
tables, and a method registered from outside plugs into the engine with no other change."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from pydantic import PositiveFloat, ValidationError
from safetensors.torch import save_file
from torch import nn

import tlkd.models  # noqa: F401  registers the CIFAR models
from tlkd.adapt.objectives import DomainObjective
from tlkd.adapt.registry import METHODS as ADAPT
from tlkd.config.schema import AdaptConfig, LossConfig, PretrainConfig, TeacherConfig
from tlkd.distill import registry
from tlkd.distill.objective import Distillation
from tlkd.distill.registry import LOSSES, LossEntry
from tlkd.distill.teacher import build_teacher
from tlkd.ssl.registry import METHODS as SSL


def test_every_entry_loads_what_the_engine_calls():
    for name, entry in LOSSES.items():
        term = entry.load()(LossConfig(type=name))
        assert isinstance(term, nn.Module), name
    for name, entry in ADAPT.items():
        cls = entry.load()
        assert issubclass(cls, DomainObjective), name
        cfg = AdaptConfig(method=name)
        assert isinstance(cls.plan_lines(cfg, 5), list)
        assert isinstance(cls.summary_fields(cfg), dict)
        assert isinstance(cls.uses_target_stats(cfg), bool)
    for name, entry in SSL.items():
        assert "->" in entry.load().plan_line(PretrainConfig(method=name), 32)


def test_schema_choices_keys_and_defaults_come_from_the_tables():
    with pytest.raises(ValidationError, match="known: " + ", ".join(LOSSES)):
        LossConfig(type="kdd")
    for name, entry in LOSSES.items():
        cfg = LossConfig(type=name)
        for key, (_, default) in entry.params.items():
            assert getattr(cfg, key) == default, (name, key)
    with pytest.raises(ValidationError, match="threshold does not apply to adapt.method 'dann'"):
        AdaptConfig(method="dann", threshold=0.5)
    assert (
        AdaptConfig(method="pseudo_label").threshold == ADAPT["pseudo_label"].params["threshold"][1]
    )
    with pytest.raises(ValidationError, match="unknown pretrain.method 'simclrr'"):
        PretrainConfig(method="simclrr")


class MSELogits(nn.Module):
    """A loss written outside tlkd: mean squared error between logits / scale."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, student, teacher, targets=None):
        return F.mse_loss(student, teacher)


def test_a_loss_registered_from_outside_plugs_in(tmp_path, monkeypatch):
    """One entry in the table and one class: the schema accepts the type, and the objective
    routes it the teachers' logits (no per-type code anywhere else)."""
    entry = LossEntry(
        f"{__name__}:MSELogits", "mse between logits", {"temperature": (PositiveFloat, 1.0)}
    )
    monkeypatch.setitem(registry.LOSSES, "mse_logits", entry)
    loss = LossConfig(type="mse_logits", weight=2.0)
    assert loss.temperature == 1.0  # its declared default
    torch.manual_seed(0)
    model = timm.create_model("resnet20", num_classes=10)
    file = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
    teacher = build_teacher(
        TeacherConfig(name="resnet20", pretrained=str(file)), "teacher", (0.5,) * 3, (0.5,) * 3
    )
    student = timm.create_model("resnet20", num_classes=10)
    classes = [str(i) for i in range(10)]
    objective = Distillation(
        student, [teacher], [loss], classes, None, [1.0], 16, torch.device("cpu")
    )
    images = torch.randn(4, 3, 16, 16)
    out = objective(student, images, torch.arange(4))
    with torch.no_grad():
        expected = 2.0 * F.mse_loss(student(images), teacher(images)[0])
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(out.parts) == {"mse_logits"}


def test_config_errors_do_not_load_torch():
    """The registries are plain data: validating a config imports neither torch nor timm."""
    code = (
        "import sys; from tlkd.config import load_config\n"
        "try: load_config(None, ['distill.losses=[{type: kdd}]'])\n"
        "except Exception as e: print(type(e).__name__)\n"
        "print('torch' in sys.modules, 'timm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ConfigError", "False", "False"], out.stdout + out.stderr


# RepDistiller scripts/run_cifar_distill.sh (-b per method) and README (crd -b 0.8); 1 for the
# rest (mdistiller's DKD / ReviewKD weights, DIST's and RKD's inner weights)
REFERENCE_WEIGHTS = {"fitnet": 100.0, "at": 1000.0, "sp": 3000.0, "pkt": 30000.0, "crd": 0.8}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_an_unweighted_term_takes_its_references_weight(name):
    assert LossConfig(type=name).weight == REFERENCE_WEIGHTS.get(name, 1.0)
    assert LossConfig(type=name, weight=0.5).weight == 0.5  # an explicit weight wins


def test_standardize_takes_the_authors_settings_where_unset():
    """sunshangquan/logit-standardization-KD, tools/train.py defaults and README: base
    temperature 2, KD weight 9; for DKD the weight multiplies alpha (1) and beta (8)."""
    kd = LossConfig(type="kd", standardize=True)
    assert (kd.temperature, kd.weight) == (2.0, 9.0)
    dkd = LossConfig(type="dkd", standardize=True)
    assert (dkd.temperature, dkd.alpha, dkd.beta, dkd.weight) == (2.0, 9.0, 72.0, 1.0)
    assert LossConfig(type="kd", standardize=True, temperature=3.0, weight=1.0).weight == 1.0
    plain = LossConfig(type="dkd")
    assert (plain.temperature, plain.alpha, plain.beta) == (4.0, 1.0, 8.0)


def test_every_shipped_config_validates_and_the_ls_rows_are_the_defaults():
    """Each YAML under configs/ loads; kd-ls and dkd-ls differ from the ``standardize: true``
    defaults only where they say why (dkd-ls: its 2-epoch warm-up of an 8-epoch budget)."""
    from conftest import REPO

    from tlkd.config.loader import load_config

    shipped = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(shipped) > 30
    for path in shipped:
        load_config(path)
    folder = REPO / "configs" / "cifar10-distill"
    assert load_config(folder / "kd-ls.yaml").distill.losses[0] == LossConfig(
        type="kd", standardize=True
    )
    assert load_config(folder / "dkd-ls.yaml").distill.losses[0] == LossConfig(
        type="dkd", standardize=True, warmup_epochs=2
    )
