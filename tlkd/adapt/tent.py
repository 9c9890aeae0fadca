"""Tent (Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021):
source-free adaptation of a trained model's BatchNorm layers. Only their scale and shift learn
(every other parameter frozen), BatchNorm normalises with the statistics of the batch at hand,
in training and evaluation alike, and the loss is the mean entropy of the softmax predictions.

The conventions are those of the official code, DequanWang/tent (tent.py: configure_model,
collect_params, softmax_entropy, forward_and_adapt; cifar10c.py and cfgs/tent.yaml for the
optimizer: Adam, lr 1e-3, betas (0.9, 0.999), no weight decay, one step per batch, batches of
200, model.train() throughout). Offline, the model adapts for ``train.epochs`` over
data.unlabeled and is then scored on data.val; online (``adapt.online``), it adapts on the
data.val stream itself, one update per batch, and each batch is scored by the outputs of the
very forward pass that adapts on it (as forward_and_adapt returns them), i.e. before that
batch's update.

What differs: tent.configure_model drops BatchNorm's running statistics (None) so that no
forward can use them; here they stay in the model and are never used by a forward either
(batch statistics in train and eval mode), but in training they follow the target batches at
BatchNorm's momentum, so the saved model.safetensors is a standard timm model whose
statistics are the target's (tent itself never saves one)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from tlkd.adapt.objectives import DomainObjective
from tlkd.config.schema import AdaptConfig
from tlkd.engine import distributed
from tlkd.engine.inference import classification_metrics
from tlkd.engine.objectives import StepOutput
from tlkd.errors import ConfigError

# what a tent run's val_top1 is not: the saved model as tlkd evaluate (or any plain use of
# model.safetensors) scores it
EVALUATE_NOTE = (
    "model.safetensors is a standard model whose BatchNorm layers use their running "
    "statistics (the target batches', at BatchNorm's momentum) in eval mode, so tlkd evaluate "
    "and plain timm score it with those, not with each batch's own: their top-1 can differ "
    "from val_top1"
)
# tent.collect_params adapts nn.BatchNorm2d layers (timm's BatchNormAct2d is one)
NORMS = (nn.BatchNorm2d,)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per row, the entropy of the softmax of ``logits`` (log-softmax, no epsilon)."""
    return -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1)


def _batch_stats_in_eval(module: nn.Module, _args: Any) -> None:
    """Forward pre-hook: in eval mode the running statistics are hidden for this forward, so
    BatchNorm normalises with the batch's own (and updates nothing)."""
    if not module.training:
        module.__dict__["_tent_running"] = (module.running_mean, module.running_var)
        module.running_mean = module.running_var = None


def _restore_running(module: nn.Module, _args: Any, _out: Any) -> None:
    saved = module.__dict__.pop("_tent_running", None)
    if saved is not None:
        module.running_mean, module.running_var = saved


def configure_model(model: nn.Module) -> list[nn.Module]:
    """Tent's configuration: every parameter frozen but the BatchNorm layers' scale and shift,
    and BatchNorm on batch statistics in eval mode too (hooks). Returns the BatchNorm layers;
    none is a config error."""
    norms = [m for m in model.modules() if isinstance(m, NORMS)]
    if not norms:
        raise ConfigError(
            "adapt.method", "tent adapts BatchNorm layers' scale and shift; the model has none"
        )
    model.requires_grad_(False)
    for m in norms:
        for name in ("weight", "bias"):
            p = getattr(m, name, None)
            if p is not None:
                p.requires_grad_(True)
        m.register_forward_pre_hook(_batch_stats_in_eval)
        m.register_forward_hook(_restore_running)
    return norms


def _tally(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(cross-entropy sum, top-1 hits, top-5 hits, rows) of a batch, float64 on the CPU; top-5
    is top-all with fewer than 5 classes, as timm's accuracy."""
    logits, targets = logits.detach().float().cpu(), targets.cpu()
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return torch.tensor(
        [
            ce.item(),
            (top[:, 0] == targets).sum().item(),
            (top == targets[:, None]).any(dim=1).sum().item(),
            len(targets),
        ],
        dtype=torch.float64,
    )


class Tent(DomainObjective):
    """``adapt.weight`` x the mean softmax entropy of each batch's predictions, BatchNorm's
    scale and shift alone learning. Online, the training batches are the labelled val stream
    in its (fixed random) order (the labels never reach the loss): the predictions of each
    step's forward are tallied and reported as ``val_loss`` / ``val_top1`` / ``val_top5``;
    the adapted model scored on the stream again after the pass is ``adapted_val_top1``."""

    title: ClassVar[str] = "Tent"
    val_batch_stats: ClassVar[bool] = True

    def __init__(
        self,
        cfg: AdaptConfig,
        source_val: Iterable | None,
        runtime: dict[str, Any],
        target_stats: Iterable | None,
        model: nn.Module,
    ):
        super().__init__(cfg, source_val, runtime)
        self.norms = len(configure_model(model))
        self.tally = torch.zeros(4, dtype=torch.float64)  # the online predictions, this epoch
        self.tally_epoch = 0

    @classmethod
    def uses_target_stats(cls, cfg: AdaptConfig) -> bool:
        return False

    @classmethod
    def online(cls, cfg: AdaptConfig) -> bool:
        return bool(cfg.online)

    @classmethod
    def plan_lines(cls, cfg: AdaptConfig, epochs: int) -> list[str]:
        scored = (
            "online: each data.val batch is scored by the forward that adapts on it, before "
            "its update (tent's forward_and_adapt); adapted_val_top1: the stream scored again "
            "after the pass"
            if cfg.online
            else "offline: adapted on data.unlabeled, then data.val scored"
        )
        return [
            "tent        source-free; BatchNorm scale and shift learn, every other parameter "
            "frozen; batch statistics in every forward (running statistics never used; they "
            "follow the target batches for the saved model); loss: mean softmax entropy x "
            f"{cfg.weight:g}, one update per batch",
            f"protocol    {scored}; each val batch normalised with its own statistics, "
            "data.val in a fixed random order (data.subset_seed), not class by class",
        ]

    @classmethod
    def summary_fields(cls, cfg: AdaptConfig) -> dict[str, Any]:
        return {
            "online": cfg.online,
            "val_protocol": (
                "online: val_top1 scores the outputs of the forward that adapts on each val "
                "batch, before its update (tent's forward_and_adapt)"
                if cfg.online
                else "offline: val_top1 after adaptation on data.unlabeled"
            )
            + "; BatchNorm on each val batch's own statistics. "
            + EVALUATE_NOTE,
        }

    def start_epoch(self, epoch: int, epochs: int) -> None:
        super().start_epoch(epoch, epochs)
        if self.tally_epoch != epoch:  # not when resuming inside this epoch
            self.tally = torch.zeros(4, dtype=torch.float64)
            self.tally_epoch = epoch

    def forward(self, model, images, targets) -> StepOutput:
        logits = model(images)
        ent = softmax_entropy(logits.float()).mean()
        if self.cfg.online:
            labelled = targets >= 0
            self.tally += _tally(logits[labelled], targets[labelled])
        return StepOutput(self.cfg.weight * ent, logits, {"entropy": ent.detach()})

    def val_scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float | None]:
        """Online: the predictions made while adapting, summed over processes; offline: the
        adapted model's."""
        if not self.cfg.online:
            return super().val_scores(outputs, targets)
        ce, top1, top5, rows = distributed.all_sum(self.tally.tolist())
        if not rows:
            return {"loss": None, "top1": None, "top5": None}
        return {"loss": ce / rows, "top1": 100.0 * top1 / rows, "top5": 100.0 * top5 / rows}

    def val_metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        if not self.cfg.online:
            return {}
        return {"adapted_val_top1": classification_metrics(logits, targets)["top1"]}

    def get_extra_state(self) -> dict[str, Any]:
        return {"tally": self.tally, "tally_epoch": self.tally_epoch}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.tally = state["tally"].cpu().to(torch.float64)
        self.tally_epoch = int(state["tally_epoch"])
