"""reviewkd (knowledge review, Chen et al. 2021): value and gradients against a transcription
of mdistiller's ReviewKD written here, with the same ABF weights; the default layers; and a
tiny distill run from YAML."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import small_config
from safetensors.torch import load_file, save_file
from torch import nn

import tlkd.models  # noqa: F401  registers the CIFAR models
from tlkd.config.schema import LossConfig
from tlkd.distill.features import PRE_LOGITS, resolve_layers
from tlkd.distill.losses.reviewkd import ReviewKD, hcl_loss
from tlkd.errors import ConfigError

# --- the reference --------------------------------------------------------------------------


def _ref_hcl_loss(fstudent, fteacher):
    """Transcribed from megvii-research/mdistiller mdistiller/distillers/ReviewKD.py
    (hcl_loss)."""
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher, strict=True):
        _, _, h, _ = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt, tot = 1.0, 1.0
        for lvl in [4, 2, 1]:
            if lvl >= h:
                continue
            cnt /= 2.0
            loss += (
                F.mse_loss(
                    F.adaptive_avg_pool2d(fs, (lvl, lvl)), F.adaptive_avg_pool2d(ft, (lvl, lvl))
                )
                * cnt
            )
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


class _RefABF(nn.Module):
    """Transcribed from megvii-research/mdistiller mdistiller/distillers/ReviewKD.py (ABF)."""

    def __init__(self, in_channel, mid_channel, out_channel, fuse):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channel),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channel),
        )
        self.att_conv = (
            nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid())
            if fuse
            else None
        )

    def forward(self, x, y=None, shape=None, out_shape=None):
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        return self.conv2(x), x


class _RefReviewKD(nn.Module):
    """Transcribed from megvii-research/mdistiller mdistiller/distillers/ReviewKD.py
    (ReviewKD.__init__ and forward_train, the feature part): IN_CHANNELS / OUT_CHANNELS
    shallow to deep, the ABFs kept deepest first (``abfs[::-1]``), SHAPES / OUT_SHAPES deepest
    first; the pooled features as 1x1 maps; ``mid_channel = min(512, in_channels[-1])``
    (``max_mid`` here: MAX_MID_CHANNEL, which the reference reads but fixes at 512)."""

    def __init__(self, in_channels, out_channels, shapes, out_shapes, max_mid=512):
        super().__init__()
        self.shapes, self.out_shapes = shapes, out_shapes
        mid_channel = min(max_mid, in_channels[-1])
        abfs = nn.ModuleList(
            _RefABF(c, mid_channel, out_channels[i], i < len(in_channels) - 1)
            for i, c in enumerate(in_channels)
        )
        self.abfs = abfs[::-1]

    def forward(self, feats, pooled_feat, t_feats, t_pooled):
        x = [*feats, pooled_feat.unsqueeze(-1).unsqueeze(-1)][::-1]
        results = []
        out_features, res_features = self.abfs[0](x[0], out_shape=self.out_shapes[0])
        results.append(out_features)
        for features, abf, shape, out_shape in zip(
            x[1:], self.abfs[1:], self.shapes[1:], self.out_shapes[1:], strict=False
        ):
            out_features, res_features = abf(features, res_features, shape, out_shape)
            results.insert(0, out_features)
        features_teacher = [*t_feats, t_pooled.unsqueeze(-1).unsqueeze(-1)]
        return _ref_hcl_loss(results, features_teacher)


def _copy_abfs(ours: ReviewKD, ref: _RefReviewKD) -> None:
    """Our ABFs (shallow to deep) into the reference's (deepest first): the same parameters
    and buffers in the same order, under other names."""
    for i, ref_abf in enumerate(ref.abfs):
        mine = ours.abfs[len(ours.abfs) - 1 - i].state_dict()
        theirs = ref_abf.state_dict()
        assert [v.shape for v in mine.values()] == [v.shape for v in theirs.values()]
        ref_abf.load_state_dict(dict(zip(theirs, mine.values(), strict=True)))


def _leaves(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


# (channels, size) per level shallow to deep, then the pooled channels
CASES = {
    # resnet56 -> resnet20 (CIFAR): 16/32/64 channels at 32/16/8 px, the same for both
    "cifar_resnet": ([(16, 32), (32, 16), (64, 8)], 64, [(16, 32), (32, 16), (64, 8)], 64),
    # other channels and a student at half the teacher's resolution (shufflev2 -> resnet32x4)
    "resized": ([(24, 8), (48, 4), (96, 2)], 96, [(16, 16), (32, 8), (64, 4)], 64),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("max_mid", [512, 32])
def test_reviewkd_parity_with_mdistiller(case, max_mid):
    """megvii-research/mdistiller mdistiller/distillers/ReviewKD.py (ABF, hcl_loss, the ABF
    chain of forward_train): value, gradients w.r.t. the student's features and the ABFs'
    parameters, and the BatchNorm statistics, train mode, on the same ABF weights."""
    s_levels, s_pooled, t_levels, t_pooled = CASES[case]
    torch.manual_seed(0)
    n = 4
    s_maps = [torch.randn(n, c, h, h) for c, h in s_levels]
    t_maps = [torch.randn(n, c, h, h) for c, h in t_levels]
    s_vec, t_vec = torch.randn(n, s_pooled), torch.randn(n, t_pooled)
    student, teacher = [*s_maps, s_vec], [*t_maps, t_vec]

    ours = ReviewKD(LossConfig(type="reviewkd", max_mid_channel=max_mid))
    ours.build([tuple(s.shape) for s in student], [tuple(t.shape) for t in teacher], "k")
    ref = _RefReviewKD(
        [c for c, _ in s_levels] + [s_pooled],
        [c for c, _ in t_levels] + [t_pooled],
        [1] + [h for _, h in reversed(s_levels)],
        [1] + [h for _, h in reversed(t_levels)],
        max_mid=max_mid,
    )
    assert ours.abfs[0].project[0].out_channels == min(max_mid, s_pooled)
    _copy_abfs(ours, ref)

    ours_in, ref_in = _leaves(student), _leaves(student)
    got = ours(ours_in, teacher)
    want = ref(ref_in[:-1], ref_in[-1], t_maps, t_vec)
    torch.testing.assert_close(got, want)

    ours_params = [p for abf in ours.abfs for p in abf.parameters()]
    ref_params = [p for abf in reversed(ref.abfs) for p in abf.parameters()]
    ours_g = torch.autograd.grad(got, [*ours_in, *ours_params])
    ref_g = torch.autograd.grad(want, [*ref_in, *ref_params])
    for a, b in zip(ours_g, ref_g, strict=True):
        torch.testing.assert_close(a, b)
    assert all(g.abs().sum() > 0 for g in ours_g)  # every input and every ABF parameter learns
    ours_bufs = [b for abf in ours.abfs for b in abf.buffers()]
    ref_bufs = [b for abf in reversed(ref.abfs) for b in abf.buffers()]
    for a, b in zip(ours_bufs, ref_bufs, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8])
def test_reviewkd_parity_hcl_levels(size):
    """megvii-research/mdistiller mdistiller/distillers/ReviewKD.py hcl_loss: the pyramid
    levels below the map's height only (none for the 1x1 pooled level)."""
    torch.manual_seed(size)
    s = [torch.randn(3, 5, size, size), torch.randn(3, 7, 1, 1)]
    t = [torch.randn(3, 5, size, size), torch.randn(3, 7, 1, 1)]
    ours_in, ref_in = _leaves(s), _leaves(s)
    got, want = hcl_loss(ours_in, t), _ref_hcl_loss(ref_in, t)
    torch.testing.assert_close(got, want)
    for a, b in zip(
        torch.autograd.grad(got, ours_in), torch.autograd.grad(want, ref_in), strict=True
    ):
        torch.testing.assert_close(a, b)


def test_reviewkd_defaults_and_layers():
    """mdistiller/engine/cfg.py: WARMUP_EPOCHS 20, MAX_MID_CHANNEL 512; the layers are the
    CIFAR ResNet's three residual stages and the pooled feature."""
    loss = LossConfig(type="reviewkd")
    assert (loss.warmup_epochs, loss.max_mid_channel) == (20, 512)
    model = timm.create_model("resnet20", num_classes=10)
    assert resolve_layers(model, None, "k", "review") == [1, 2, 3, PRE_LOGITS]
    with pytest.raises(ConfigError, match="NCHW"):
        ReviewKD(loss).build([(2, 8, 4)], [(2, 8, 4)], "distill.losses.0")


def test_reviewkd_distill_run_from_yaml(tmp_path, squares, write_config, run_cli):
    """A tiny distill run: it finishes, logs train_loss_reviewkd, and the saved student holds
    no ABF parameters (the checkpoint does)."""
    torch.manual_seed(0)
    teacher_file = tmp_path / "teacher.safetensors"
    teacher = timm.create_model("resnet20", num_classes=3)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(teacher_file))
    cfg = small_config(tmp_path, *squares, experiment="review", train={"epochs": 1})
    cfg["model"]["name"] = "resnet20"
    cfg["teacher"] = {"name": "resnet20", "pretrained": str(teacher_file)}
    cfg["distill"] = {
        "losses": [{"type": "ce", "weight": 1.0}, {"type": "reviewkd", "weight": 5.0}]
    }
    proc = run_cli("distill", write_config(cfg, "review.yaml"))
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "review"
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train_loss_reviewkd"] > 0
    saved = load_file(run / "model.safetensors")
    assert set(saved) == set(timm.create_model("resnet20", num_classes=3).state_dict())
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert any(".abfs." in k for k in ckpt["objective"])
