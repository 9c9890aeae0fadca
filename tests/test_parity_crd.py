"""crd: contrastive representation distillation (Tian et al., ICLR 2020).

Parity of values and gradients (the student's embedding input, both Embed heads), of the
normalisation constants Z and of the memory banks after their momentum update, with an
independent implementation written here after the conventions of the reference,
HobbitLong/RepDistiller: ``crd/criterion.py`` (CRDLoss, Embed, ContrastLoss), ``crd/memory.py``
(ContrastMemory: the banks ``memory_v1`` of student and ``memory_v2`` of teacher embeddings, Z
kept in a ``params`` buffer, set from the first batch), and ``dataset/cifar100.py``
(CIFAR100InstanceSample, mode ``exact``: the positive is the sample itself, the negatives are
drawn from other classes, with replacement when more are asked for than there are). Given the
same negatives, Embed weights and bank contents. Then the data plumbing (each batch's dataset
indices on both data paths and per rank) and tiny distillation runs from YAML, with a resume.
"""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import tlkd.models  # noqa: F401  registers the CIFAR models
from tlkd.config import load_config
from tlkd.config.schema import LossConfig
from tlkd.data.datasets import build_splits
from tlkd.data.memory import MemoryLoader
from tlkd.data.pipeline import build_loaders
from tlkd.distill.indexed import BatchIndices, IndexedLoader
from tlkd.distill.losses.crd import CRD, bank_scores
from tlkd.distill.registry import LOSSES
from tlkd.engine.distributed import GlobalBatchSampler
from tlkd.errors import TlkdError

# --- the reference, after RepDistiller's conventions -----------------------------------------

REF_EPS = 1e-7


class _RefNormalize(nn.Module):
    """x / (sum x^p)^(1/p) over dim 1, no floor."""

    def forward(self, x):
        return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


class _RefEmbed(nn.Module):
    """view(B, -1) -> Linear -> l2 normalise."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.l2norm = _RefNormalize()

    def forward(self, x):
        return self.l2norm(self.linear(x.view(x.shape[0], -1)))


class _RefMemory(nn.Module):
    """Two banks (v1: student, v2: teacher), params = [K, T, Z_v1, Z_v2, momentum] (Z unset:
    -1). Scores gather the contrast rows, bmm, exp(/T); Z = mean score x n_data on first use;
    scores / Z; then each bank's rows at y move by momentum and are renormalised."""

    def __init__(self, memory_v1, memory_v2, K, T, momentum):
        super().__init__()
        self.register_buffer("params", torch.tensor([K, T, -1, -1, momentum]))
        self.register_buffer("memory_v1", memory_v1.clone())
        self.register_buffer("memory_v2", memory_v2.clone())

    def forward(self, v1, v2, y, idx):
        k = int(self.params[0].item())
        t = self.params[1].item()
        momentum = self.params[4].item()
        bsz, n_data, dim = v1.size(0), self.memory_v1.size(0), self.memory_v1.size(1)
        rows1 = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach().view(bsz, k + 1, dim)
        out_v2 = torch.exp(torch.div(torch.bmm(rows1, v2.view(bsz, dim, 1)), t))
        rows2 = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach().view(bsz, k + 1, dim)
        out_v1 = torch.exp(torch.div(torch.bmm(rows2, v1.view(bsz, dim, 1)), t))
        if self.params[2].item() < 0:
            self.params[2] = out_v1.mean() * n_data
        if self.params[3].item() < 0:
            self.params[3] = out_v2.mean() * n_data
        z_v1, z_v2 = self.params[2].clone().detach().item(), self.params[3].clone().detach().item()
        out_v1 = torch.div(out_v1, z_v1).contiguous()
        out_v2 = torch.div(out_v2, z_v2).contiguous()
        with torch.no_grad():
            for bank, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
                pos = torch.index_select(bank, 0, y.view(-1))
                pos.mul_(momentum).add_(torch.mul(v, 1 - momentum))
                bank.index_copy_(0, y, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))
        return out_v1, out_v2


def _ref_contrast_loss(x, n_data):
    """Eq. 18: noise Pn = 1 / n_data, m = K; -(sum log D1 + sum log D0) / bsz."""
    bsz, m = x.shape[0], x.size(1) - 1
    pn = 1 / float(n_data)
    p_pos = x.select(1, 0)
    log_d1 = torch.div(p_pos, p_pos.add(m * pn + REF_EPS)).log_()
    p_neg = x.narrow(1, 1, m)
    log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + REF_EPS)).log_()
    return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz


class _RefCRD(nn.Module):
    def __init__(self, s_dim, t_dim, feat_dim, memory_v1, memory_v2, k, t, m):
        super().__init__()
        self.embed_s, self.embed_t = _RefEmbed(s_dim, feat_dim), _RefEmbed(t_dim, feat_dim)
        self.contrast = _RefMemory(memory_v1, memory_v2, k, t, m)
        self.n_data = memory_v1.shape[0]

    def forward(self, f_s, f_t, idx, contrast_idx):
        out_s, out_t = self.contrast(self.embed_s(f_s), self.embed_t(f_t), idx, contrast_idx)
        return _ref_contrast_loss(out_s, self.n_data) + _ref_contrast_loss(out_t, self.n_data)


def _ref_negatives(labels: torch.Tensor, index: int) -> set[int]:
    """The other-class pool of one sample (CIFAR100InstanceSample.cls_negative)."""
    return set(torch.nonzero(labels != labels[index]).flatten().tolist())


# --- helpers ---------------------------------------------------------------------------------


def _term(labels, s_dim=12, t_dim=20, **params) -> CRD:
    term = CRD(LossConfig(type="crd", **params))
    term.build([(2, s_dim)], [(2, t_dim)], "distill.losses.0")
    term.attach_data(labels, BatchIndices(), "distill.losses.0")
    return term


def _reference_of(term: CRD, s_dim=12, t_dim=20) -> _RefCRD:
    ref = _RefCRD(
        s_dim, t_dim, term.feat_dim, term.memory_s, term.memory_t, term.nce_k, term.nce_t,
        term.nce_m,
    )  # fmt: skip
    ref.embed_s.linear.load_state_dict(term.embed_s.linear.state_dict())
    ref.embed_t.linear.load_state_dict(term.embed_t.linear.state_dict())
    return ref


def _all_params(module: nn.Module) -> list[torch.Tensor]:
    return [p for embed in (module.embed_s, module.embed_t) for p in embed.linear.parameters()]


LABELS = torch.tensor([0] * 3 + [1] * 5 + [2] * 9 + [3] * 7)  # 24 samples, unequal classes


# --- parity ----------------------------------------------------------------------------------


# 16: class 2 has 15 other-class samples (with replacement); feat_dim 2: the banks' rows are
# gathered first (bank_scores' sparse branch), else one product with the whole bank
@pytest.mark.parametrize(("nce_k", "feat_dim"), [(6, 8), (16, 8), (6, 2)])
def test_crd_parity_value_gradients_z_and_banks_over_two_steps(nce_k, feat_dim):
    torch.manual_seed(0)
    term = _term(LABELS, feat_dim=feat_dim, nce_k=nce_k)
    ref = _reference_of(term)
    for step in range(2):
        idx = torch.randperm(len(LABELS))[:6]
        contrast = torch.cat([idx[:, None], term.negatives(idx)], dim=1)
        f_s, f_t = torch.randn(6, 12), torch.randn(6, 20)  # the teacher: no gradient
        ours_in, ref_in = f_s.clone().requires_grad_(True), f_s.clone().requires_grad_(True)
        ours = term.contrast(ours_in, f_t, idx, contrast)
        expected = ref(ref_in, f_t, idx, contrast)
        assert ours.dim() == 0 and torch.isfinite(ours)
        torch.testing.assert_close(ours, expected.reshape(()))
        ours_grads = torch.autograd.grad(ours, [ours_in, *_all_params(term)])
        ref_grads = torch.autograd.grad(expected.sum(), [ref_in, *_all_params(ref)])
        for a, b in zip(ours_grads, ref_grads, strict=True):
            assert a.abs().sum() > 0
            torch.testing.assert_close(a, b)
        # Z: set from the first batch, then kept; the banks after the momentum update
        torch.testing.assert_close(term.z, ref.contrast.params[2:4])
        torch.testing.assert_close(term.memory_s, ref.contrast.memory_v1)
        torch.testing.assert_close(term.memory_t, ref.contrast.memory_v2)
        if step == 0:
            z_first = term.z.clone()
            assert (z_first > 0).all()
            touched = torch.zeros(len(LABELS), dtype=torch.bool)
            touched[idx] = True
            assert torch.allclose(term.memory_s.norm(dim=1)[touched], torch.ones(6))
    assert torch.equal(term.z, z_first)


def test_crd_a_non_finite_batch_leaves_the_banks_and_z_as_they_were():
    """A step whose loss is NaN/Inf is skipped (train.skip_nonfinite), but the term updated
    its banks in the forward: a NaN row would be drawn as a negative by every later batch (and
    a NaN Z would stay), so every later loss would be NaN. Rows of samples whose embedding is
    not finite keep their values, Z is set from the next finite batch; the other rows of the
    batch still move (here the finite half), and training goes on with finite losses."""
    torch.manual_seed(4)
    term = _term(LABELS, feat_dim=8, nce_k=6)
    banks = (term.memory_s.clone(), term.memory_t.clone())
    idx = torch.tensor([0, 5, 10, 20])
    f_s, f_t = torch.randn(4, 12), torch.randn(4, 20)
    f_s[:2] = float("nan")  # two samples' student features overflowed
    with torch.no_grad():
        loss = term.contrast(f_s, f_t, idx, torch.cat([idx[:, None], term.negatives(idx)], 1))
    assert not torch.isfinite(loss)
    assert torch.equal(term.z, torch.tensor([-1.0, -1.0]))  # not set from a NaN batch
    assert torch.isfinite(term.memory_s).all() and torch.isfinite(term.memory_t).all()
    for bank, before in zip((term.memory_s, term.memory_t), banks, strict=True):
        assert torch.equal(bank[idx[:2]], before[idx[:2]])
        assert not torch.equal(bank[idx[2:]], before[idx[2:]])
    ok = torch.tensor([1, 2, 3, 4])
    loss = term.contrast(
        torch.randn(4, 12), torch.randn(4, 20), ok,
        torch.cat([ok[:, None], term.negatives(ok)], 1),
    )  # fmt: skip
    assert torch.isfinite(loss) and (term.z > 0).all()


def test_crd_bank_scores_dense_and_gathered_agree():
    torch.manual_seed(3)
    bank, v = torch.randn(50, 4), torch.randn(3, 4, requires_grad=True)
    contrast = torch.randint(50, (3, 7))
    dense = bank_scores(bank, v, contrast, dense=True)
    gathered = bank_scores(bank, v, contrast, dense=False)
    expected = torch.stack([bank[contrast[b]] @ v[b] for b in range(3)])
    torch.testing.assert_close(dense, expected)
    torch.testing.assert_close(gathered, expected)
    w = torch.randn(3, 7)
    g_dense, g_gathered = (torch.autograd.grad((s * w).sum(), v)[0] for s in (dense, gathered))
    torch.testing.assert_close(g_dense, g_gathered)


def test_crd_parity_banks_start_as_the_reference_and_the_term_reads_the_slot():
    """Banks uniform in +-1/sqrt(feat_dim / 3); forward takes the slot's indices, puts the
    positive first and draws the negatives, as CRDLoss(f_s, f_t, index, contrast_idx)."""
    torch.manual_seed(1)
    term = _term(LABELS, feat_dim=12, nce_k=5)
    bound = 1 / math.sqrt(12 / 3)
    for bank in (term.memory_s, term.memory_t):
        assert bank.shape == (24, 12)
        assert bank.abs().max() <= bound and bank.abs().max() > 0.9 * bound
    assert torch.equal(term.z, torch.tensor([-1.0, -1.0]))
    ref = _reference_of(term)
    idx = torch.tensor([3, 0, 17, 9])
    f_s, f_t = torch.randn(4, 12), torch.randn(4, 20)
    with pytest.raises(TlkdError, match="dataset indices"):
        term([f_s], [f_t])
    term.batch.indices = idx
    state = torch.get_rng_state()
    ours = term([f_s], [f_t])
    torch.set_rng_state(state)  # the same draw of negatives
    contrast = torch.cat([idx[:, None], term.negatives(idx)], dim=1)
    torch.testing.assert_close(ours, ref(f_s, f_t, idx, contrast).reshape(()))
    # state_dict: the heads and the banks (checkpointed with the objective)
    assert set(term.state_dict()) == {
        "embed_s.linear.weight", "embed_s.linear.bias", "embed_t.linear.weight",
        "embed_t.linear.bias", "memory_s", "memory_t", "z",
    }  # fmt: skip


def test_crd_parity_negatives_exact_mode():
    """Other classes only; without replacement while nce_k fits the other-class samples,
    with replacement beyond (np.random.choice(..., replace=k > len)); uniform; seeded."""
    term = _term(LABELS, nce_k=16)
    torch.manual_seed(2)
    idx = torch.arange(len(LABELS)).repeat(300)
    negatives = term.negatives(idx)
    assert negatives.shape == (len(idx), 16)
    for row, i in zip(negatives[:24], idx[:24].tolist(), strict=True):
        pool = _ref_negatives(LABELS, i)
        assert set(row.tolist()) <= pool
        if len(pool) >= 16:  # classes 0, 1, 3: 21, 19, 17 others
            assert len(set(row.tolist())) == 16
    # class 2 (15 others): with replacement, so some repeat, every other sample drawn
    rows2 = negatives[LABELS[idx] == 2]
    assert any(len(set(r.tolist())) < 16 for r in rows2)
    counts = torch.bincount(rows2.flatten(), minlength=24).float()
    assert (counts[LABELS == 2] == 0).all()
    others = counts[LABELS != 2]
    assert (others - others.mean()).abs().max() < 0.15 * others.mean()  # uniform
    # class 3 without replacement, uniform over its 17 others
    counts = torch.bincount(negatives[LABELS[idx] == 3].flatten(), minlength=24).float()
    others = counts[LABELS != 3]
    assert (counts[LABELS == 3] == 0).all()
    assert (others - others.mean()).abs().max() < 0.1 * others.mean()
    torch.manual_seed(2)
    assert torch.equal(term.negatives(idx), negatives)  # the global torch RNG: seeded


def test_crd_entry_and_defaults_are_repdistillers():
    """train_student.py: --feat_dim 128, --nce_k 16384, --nce_t 0.07, --nce_m 0.5; CRD reads
    feat[-1] (the embedding)."""
    entry = LOSSES["crd"]
    assert (entry.inputs, entry.layers) == ("features", "embedding")
    cfg = LossConfig(type="crd")
    assert (cfg.feat_dim, cfg.nce_k, cfg.nce_t, cfg.nce_m) == (128, 16384, 0.07, 0.5)


def test_shipped_config_uses_repdistillers_weight():
    """README: ``--distill crd -a 0 -b 0.8`` (cross-entropy -r 1), teacher as for kd."""
    from conftest import REPO

    folder = REPO / "configs" / "cifar10-distill"
    cfg = load_config(folder / "crd.yaml")
    assert cfg.experiment == "c10-resnet20-crd"
    assert cfg.teacher == load_config(folder / "kd.yaml").teacher
    assert [(loss.type, loss.weight) for loss in cfg.distill.losses] == [("crd", 0.8), ("ce", 1.0)]


# --- the batch indices on both data paths and per rank ----------------------------------------


def _loaders(tmp_path, in_memory: bool, world: int = 1, rank: int = 0):
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "data.dataset=digits",
            "data.image_size=8",  # the digits' own size: no resize on either path
            "data.crop_pct=1.0",
            "data.interpolation=bilinear",
            "data.samples_per_class=3",
            "data.num_workers=0",
            f"data.in_memory={str(in_memory).lower()}",
            "data.augment={crop_mode: rkrr, scale: [1, 1], ratio: [1, 1], hflip: 0, "
            "color_jitter: 0}",
            "train.batch_size=8",
        ],
    )
    splits = build_splits(cfg.data, 0)
    model_cfg = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    loaders = build_loaders(cfg, splits, model_cfg, torch.device("cpu"), log=lambda _: None)
    train = loaders.train
    if world > 1:
        assert isinstance(train, MemoryLoader)
        train.sampler = GlobalBatchSampler(len(splits.train), 8, cfg.seed, world=world, rank=rank)
        train.batch_size = 8 // world
    labels = torch.tensor(splits.train.targets)
    slot = BatchIndices()
    return IndexedLoader(train, slot, labels), slot, splits


def _epoch(loader: IndexedLoader, slot: BatchIndices, epoch: int):
    loader.sampler.set_epoch(epoch)
    return [(images, targets, slot.indices) for images, targets in loader]


def test_crd_batch_indices_on_both_data_paths(tmp_path):
    """Each batch's slot holds the dataset indices of exactly its images, on the in-memory
    path and on loader workers: both paths give the same image for the same index."""
    by_index = {}
    for in_memory in (True, False):
        loader, slot, splits = _loaders(tmp_path, in_memory)
        assert isinstance(loader.loader, MemoryLoader) == in_memory
        batches = _epoch(loader, slot, 2)
        assert len(batches) == len(loader) == 3  # 30 images, batches of 8, last dropped
        assert slot.indices is None  # cleared after the epoch
        seen = torch.cat([idx for _, _, idx in batches])
        assert len(set(seen.tolist())) == 24
        for images, targets, idx in batches:
            assert torch.equal(targets, torch.tensor(splits.train.targets)[idx])
            for image, i in zip(images, idx.tolist(), strict=True):
                if i in by_index:
                    torch.testing.assert_close(image, by_index[i], atol=1e-5, rtol=0)
                else:
                    by_index[i] = image
    # the digits differ image by image: the indices pick the right ones, not just a label
    assert len(by_index) >= 24


def test_crd_batch_indices_are_global_per_rank(tmp_path):
    """Under torchrun each rank holds a slice of every global batch: the slots of the two
    ranks together are the single process's batch, as indices into the whole training set."""
    single, slot1, _ = _loaders(tmp_path, True)
    ranks = [_loaders(tmp_path, True, world=2, rank=r) for r in (0, 1)]
    for epoch in (1, 2):
        whole = _epoch(single, slot1, epoch)
        parts = [_epoch(loader, slot, epoch) for loader, slot, _ in ranks]
        for (_, _, idx), a, b in zip(whole, *parts, strict=True):
            assert torch.equal(idx, torch.cat([a[2], b[2]]))


# --- tiny runs from YAML ----------------------------------------------------------------------


def _config(tmp_path, write_config, name: str, epochs: int, in_memory: bool = True):
    weights = tmp_path / "teacher.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        teacher = timm.create_model("test_resnet", num_classes=10)
        save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(weights))
    return write_config(
        {
            "experiment": name,
            "output_dir": str(tmp_path / "runs"),
            "seed": 0,
            "model": {"name": "resnet20", "pretrained": False},
            "teacher": {"name": "test_resnet", "pretrained": str(weights)},
            "data": {
                "dataset": "digits",
                "image_size": 16,
                "samples_per_class": 6,
                "num_workers": 0,
                "in_memory": in_memory,
            },
            "train": {
                "epochs": epochs,
                "batch_size": 12,
                "device": "cpu",
                "precision": "fp32",
                "channels_last": False,
                "log_every": 1000,
                "scheduler": {"name": "none"},
            },
            "distill": {
                "losses": [
                    # 60 samples, 54 of other classes per class: 64 negatives with replacement
                    {"type": "crd", "weight": 0.8, "feat_dim": 16, "nce_k": 64},
                    {"type": "ce", "weight": 1.0},
                ]
            },
        },
        f"{name}.yaml",
    )


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


LEARNED = ("train_loss", "train_loss_crd", "train_loss_ce", "train_top1", "val_loss", "val_top1")


def test_crd_tiny_distillation_from_yaml_and_exact_resume(tmp_path, write_config, run_cli):
    """Two epochs straight, and one epoch then ``--resume`` to two: the same losses, student,
    heads, banks and Z. The saved student holds no CRD parameters; the checkpoint does."""
    full = run_cli("distill", _config(tmp_path, write_config, "full", 2))
    assert full.returncode == 0, full.stdout + full.stderr
    assert "memory banks 2 x 60 x 16" in full.stdout and "with replacement" in full.stdout
    part = run_cli("distill", _config(tmp_path, write_config, "part", 1))
    assert part.returncode == 0, part.stdout + part.stderr
    runs = tmp_path / "runs"
    resumed = run_cli("distill", "--resume", runs / "part", "train.epochs=2")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from checkpoint.pt" in resumed.stdout
    for name in ("full", "part"):
        run = runs / name
        summary = json.loads((run / "summary.json").read_text())
        assert (summary["status"], summary["epochs_done"]) == ("finished", 2)
        rows = _rows(run)
        assert all(math.isfinite(r["train_loss_crd"]) and r["train_loss_crd"] > 0 for r in rows)
        saved = load_file(run / "model.safetensors")
        assert set(saved) == set(timm.create_model("resnet20", num_classes=10).state_dict())
    assert [{k: r[k] for k in LEARNED} for r in _rows(runs / "part")] == [
        {k: r[k] for k in LEARNED} for r in _rows(runs / "full")
    ]
    a = torch.load(runs / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(runs / "part" / "checkpoint.pt", weights_only=True)
    crd = {k: v for k, v in a["objective"].items() if k.startswith("terms.0.")}
    assert set(crd) == {
        f"terms.0.{k}"
        for k in (
            "embed_s.linear.weight", "embed_s.linear.bias", "embed_t.linear.weight",
            "embed_t.linear.bias", "memory_s", "memory_t", "z",
        )
    }  # fmt: skip
    assert crd["terms.0.memory_s"].shape == (60, 16) and (crd["terms.0.z"] > 0).all()
    for key in crd:
        assert torch.equal(a["objective"][key], b["objective"][key]), key
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_crd_tiny_distillation_on_loader_workers(tmp_path, write_config, run_cli):
    """The DataLoader path (data.in_memory: false) feeds the indices as well."""
    proc = run_cli("distill", _config(tmp_path, write_config, "workers", 1, in_memory=False))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "runs" / "workers"
    assert json.loads((run / "summary.json").read_text())["data_path"].startswith("0 loader")
    (row,) = _rows(run)
    assert math.isfinite(row["train_loss_crd"]) and row["train_loss_crd"] > 0


def test_crd_refuses_unlabeled_images(tmp_path, write_config, run_cli, make_images):
    config = _config(tmp_path, write_config, "unlabeled", 1)
    proc = run_cli(
        "distill", config, f"data.unlabeled={make_images('extra', per_class=2)}", "--dry-run"
    )
    assert proc.returncode == 2
    assert "crd indexes the labelled training set: not with data.unlabeled" in proc.stderr


def test_crd_needs_one_pair_of_layers():
    term = CRD(LossConfig(type="crd"))
    with pytest.raises(Exception, match="one pair of layers"):
        term.build([(2, 8), (2, 8)], [(2, 8), (2, 8)], "distill.losses.0")


# --- torchrun: the banks stay the same on every rank ------------------------------------------


RANK_SCRIPT = """
import os, sys
import torch
from tlkd.config.schema import LossConfig
from tlkd.distill.indexed import BatchIndices
from tlkd.distill.losses.crd import CRD, bank_scores
from tlkd.engine import distributed

def case():
    torch.manual_seed(0)
    term = CRD(LossConfig(type="crd", feat_dim=8, nce_k=10))
    term.build([(2, 12)], [(2, 20)], "k")
    term.attach_data(torch.tensor([0] * 3 + [1] * 5 + [2] * 9 + [3] * 7), BatchIndices(), "k")
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(24, generator=g)[:8]
    contrast = torch.cat([idx[:, None], term.negatives(idx)], dim=1)
    return term, idx, contrast, torch.randn(8, 12, generator=g), torch.randn(8, 20, generator=g)

torch.set_num_threads(1)
distributed.init_from_env("cpu")
rank = distributed.info().rank
term, idx, contrast, f_s, f_t = case()
rows = slice(0, 5) if rank == 0 else slice(5, 8)  # unequal shares (a ragged batch)
share = term.contrast(f_s[rows], f_t[rows], idx[rows], contrast[rows]).item() * len(idx[rows])
distributed.shutdown()
term_1, idx, contrast, f_s, f_t = case()  # one process, the whole batch
whole = term_1.contrast(f_s, f_t, idx, contrast).item() * len(idx)
torch.save({"share": share, "whole": whole, "ddp": term.state_dict(),
            "single": term_1.state_dict()}, sys.argv[1])
"""


def test_crd_two_ranks_update_the_banks_with_every_ranks_rows(tmp_path):
    """Two gloo processes, each with its share of one batch: both end with the banks and Z of
    one process that saw the whole batch (so DDP's buffer broadcast changes nothing), and
    their losses add up to its loss."""
    import socket
    import subprocess
    import sys

    from conftest import tlkd_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = tlkd_env()
        env.update(
            WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )  # fmt: skip
        cmd = [sys.executable, "-c", RANK_SCRIPT, str(tmp_path / f"rank{rank}.pt")]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank in (0, 1):
        for key in ("memory_s", "memory_t", "z"):
            torch.testing.assert_close(out[rank]["ddp"][key], out[rank]["single"][key])
    assert out[0]["share"] + out[1]["share"] == pytest.approx(out[0]["whole"], rel=1e-5)
