"""pretrain: unsupervised transfer. A timm backbone learns from unlabelled images (SimCLR,
BYOL or SimSiam); a k-NN monitor on the labelled val set scores every epoch and picks the
best; the saved backbone (no classifier) is what ``finetune`` and ``distill`` take as
``pretrained: <run dir>``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlkd.config.schema import Config, PretrainConfig
from tlkd.data.datasets import unlabeled
from tlkd.data.pipeline import extra_loader
from tlkd.engine.progress import Reporter
from tlkd.errors import ConfigError
from tlkd.models.head import feature_width
from tlkd.recipes.build import build_experiment, subset_seed
from tlkd.recipes.runner import train
from tlkd.ssl.registry import METHODS as SSL_METHODS
from tlkd.ssl.simclr import TwoViews


def pretrain(
    cfg: Config,
    *,
    dry_run: bool = False,
    reporter: Reporter | None = None,
    resume: Path | None = None,
) -> dict[str, Any] | None:
    """Pretrain as ``cfg`` says; returns the run's summary (None for a dry run)."""
    if cfg.teacher_list or cfg.distill is not None or cfg.adapt is not None:
        key = "teacher" if cfg.teacher_list else ("distill" if cfg.distill else "adapt")
        raise ConfigError(key, "pretrain takes no teachers, distill or adapt section")
    if cfg.data.unlabeled is None:
        raise ConfigError("data.unlabeled", "pretrain learns from an image folder (labels unused)")
    if cfg.data.val is None:
        raise ConfigError(
            "data.val", "pretrain needs a labelled val folder: its k-NN score picks the best epoch"
        )
    if cfg.model.head is not None:
        raise ConfigError("model.head", "pretrain trains a backbone; add the head in finetune")
    if cfg.data.train is not None:
        raise ConfigError("data.train", "pretrain reads data.unlabeled; leave data.train out")
    implied: dict[str, Any] = {"data.dataset": "folder"}  # data.unlabeled: an image folder
    if cfg.pretrain is None:
        implied["pretrain"] = PretrainConfig().model_dump(mode="json")
    reporter = reporter or Reporter(cfg.train.log_every)
    images = unlabeled(cfg.data.unlabeled, cfg.data.unlabeled_limit, subset_seed(cfg))
    exp = build_experiment(
        cfg, log=reporter.print, resume=resume, dry_run=dry_run, classifier=False,
        implied=implied,
    )  # fmt: skip
    cfg = exp.cfg
    loader = extra_loader(
        cfg, images, exp.model_cfg, exp.device, train=True, in_memory=exp.loaders.in_memory,
        generator=exp.loaders.train.generator, seed_offset=0, log=reporter.print,
        two_views=True,
    )  # fmt: skip
    exp.loaders.train = TwoViews(loader)
    features = feature_width(exp.model)  # the backbone's output width (no classifier)
    p = cfg.pretrain
    method = SSL_METHODS[p.method].load()
    objective = method(features, p)
    plan = [
        f"pretrain    {p.method} on {len(images):,} unlabelled images ({cfg.data.unlabeled}), "
        f"two views each; {method.plan_line(p, features)}; k-NN (k={p.knn_k}) on "
        f"{len(exp.splits.val):,} val images"
    ]
    extra = {"pretrain": p.method, "unlabeled_images": len(images), "feature_dim": features}
    return train(exp, objective, "pretrain", reporter, dry_run, plan, extra, resume)
