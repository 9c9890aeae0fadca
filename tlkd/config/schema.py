"""The experiment schema: every key an experiment file may hold, with its type and default.

A minimal experiment is a few lines; everything else has a default. Unknown keys are errors
(``extra="forbid"``) so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    create_model,
    field_validator,
    model_validator,
)

from tlkd.adapt.registry import METHODS
from tlkd.config.registry import check_name, fill_params, param_fields
from tlkd.data.catalog import DATASET_NAMES
from tlkd.distill.registry import LOSSES
from tlkd.ssl.registry import METHODS as SSL_METHODS

ScalarArg = bool | int | float | str


class Section(BaseModel):
    """Base of every config section: strict about unknown keys, and read-only once validated
    (values tlkd chooses go into a new config, see tlkd.config.loader.with_values)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        protected_namespaces=(),
        coerce_numbers_to_str=True,
    )


class HeadConfig(Section):
    """New layers that replace the model's classifier (the last layer is always a Linear)."""

    hidden: list[PositiveInt] = Field(default_factory=list)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"


class LoraConfig(Section):
    """LoRA (Hu et al. 2021) through HuggingFace PEFT (tlkd/models/lora.py): low-rank adapters
    on the ``targets`` layers, everything else frozen but the classifier; the saved weights
    have the adapters merged in (a plain timm state dict)."""

    rank: PositiveInt = 8
    alpha: PositiveFloat = 16.0  # the adapters' update B A is scaled by alpha / rank
    # Linear or Conv2d layers by module name or dotted suffix (peft's target_modules);
    # default: a ViT's attn.qkv, attn.proj, mlp.fc1, mlp.fc2 (those the model has)
    targets: list[str] | None = Field(None, min_length=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # on the adapters' input

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not all(t.strip(".") == t and t for t in v):
                raise ValueError("expected module names or dotted suffixes, e.g. attn.qkv")
            if len(set(v)) != len(v):
                raise ValueError("lists a target twice")
        return v


class ModelConfig(Section):
    """Which timm model to build, where its weights come from, and what trains."""

    name: str = "resnet18"
    # auto: timm's hub weights when they can be had (cache or network), else random weights
    # with a warning; true: hub weights or an error; false: random init; a string: weights
    # file or tlkd run dir.
    pretrained: bool | str = "auto"
    num_classes: NonNegativeInt | None = None  # default: the data's class count; 0: none (pretrain)
    freeze: Literal["none", "backbone"] | list[str] = "none"
    freeze_bn_stats: bool = True  # BatchNorm layers inside frozen modules keep their statistics
    unfreeze_after: PositiveInt | None = None  # epochs after which frozen modules train too
    head: HeadConfig | None = None  # omit for a linear classifier
    lora: LoraConfig | None = None  # finetune: LoRA adapters instead of training the backbone
    drop_rate: NonNegativeFloat | None = None
    drop_path_rate: NonNegativeFloat | None = None
    kwargs: dict[str, ScalarArg | list[ScalarArg]] = Field(default_factory=dict)

    @field_validator("pretrained", mode="before")
    @classmethod
    def _pretrained(cls, v: Any) -> Any:
        if isinstance(v, bool) or (isinstance(v, str) and v.strip()):
            return v
        raise ValueError(
            f"expected auto, true, false, or a path to weights or a run directory, got {v!r}"
        )

    @field_validator("freeze", mode="before")
    @classmethod
    def _freeze(cls, v: Any) -> Any:
        if v is None:
            return "none"
        if v in ("none", "backbone"):
            return v
        if isinstance(v, str):
            from tlkd.config.suggest import did_you_mean

            hint = did_you_mean(v, ["none", "backbone"])
            raise ValueError(f"expected none, backbone, or a list of module names, got {v!r}{hint}")
        if isinstance(v, list) and all(isinstance(s, str) and s for s in v):
            return v
        raise ValueError("expected none, backbone, or a list of module names")


class AugmentConfig(Section):
    """Training augmentation, passed to timm.data.create_transform. ``policy`` fills every key
    left out (tlkd/data/defaults.py: ``auto`` picks none, light or strong from the data and
    the run); keys set explicitly win. The defaults below are the ``strong`` policy's."""

    policy: Literal["auto", "none", "light", "strong"] = "auto"
    crop_mode: Literal["rrc", "rkrc", "rkrr"] = "rrc"  # timm's train_crop_mode
    scale: tuple[PositiveFloat, PositiveFloat] = (0.08, 1.0)
    ratio: tuple[PositiveFloat, PositiveFloat] = (3 / 4, 4 / 3)
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    vflip: float = Field(0.0, ge=0.0, le=1.0)
    color_jitter: NonNegativeFloat = 0.4
    grayscale: float = Field(0.0, ge=0.0, le=1.0)  # probability of a grey image (SimCLR: 0.2)
    auto_augment: str | None = None  # e.g. "rand-m9-mstd0.5" (timm RandAugment string)
    re_prob: float = Field(0.0, ge=0.0, le=1.0)  # random erasing

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        if self.scale[0] > self.scale[1] or self.scale[1] > 1.0:
            raise ValueError("scale must be [low, high] with low <= high <= 1")
        return self


class DataConfig(Section):
    """Where images come from and how they are split, subset and transformed."""

    # folder (one sub-folder per class), digits (embedded, the default), or a torchvision name
    dataset: str | None = None
    train: Path | None = None
    val: Path | None = None
    unlabeled: Path | None = None  # adapt: the target domain; pretrain: the images (no labels)
    unlabeled_limit: PositiveInt | None = None  # at most this many of them (seeded subset)
    root: Path = Path("~/.cache/tlkd/datasets")  # torchvision datasets live (or download) here
    download: bool = False
    image_size: PositiveInt | None = None  # default: the model's, or 32 for tiny-image datasets
    crop_pct: float | None = Field(None, gt=0.0, le=1.0)  # eval center-crop fraction
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    classes: list[str] | None = None  # keep only these classes, in this order
    samples_per_class: PositiveInt | None = None  # few-label training, seeded
    fraction: float | None = Field(None, gt=0.0, le=1.0)  # or a fraction of each class
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # held out of train when there is no val
    # seed of the val hold-out and the few-label picks; default: the run's seed. Fix it to
    # compare seeds of training on the same images.
    subset_seed: NonNegativeInt | None = None
    num_workers: NonNegativeInt | None = None  # default: min(4, CPU count)
    # decode once into uint8 tensors (cached on disk) and augment whole batches: auto = when
    # the images fit in memory, share one size and the augmentation allows it
    in_memory: bool | Literal["auto"] = "auto"
    cache_dir: Path | None = None  # default: $TLKD_CACHE_DIR or ~/.cache/tlkd
    skip_bad_images: bool = False  # decode every file first; leave out (and count) bad ones
    # training images (loader workers and the in-memory store): decode JPEGs at 1/2, 1/4 or
    # 1/8 scale where the smaller image still holds every pixel the transforms sample
    # (tlkd/data/decode.py); false: full decodes
    jpeg_draft: bool = True
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str | None) -> str | None:
        if v is not None and v not in DATASET_NAMES:
            from tlkd.config.suggest import did_you_mean

            raise ValueError(
                f"unknown dataset {v!r}{did_you_mean(v, DATASET_NAMES)}; "
                f"known: {', '.join(DATASET_NAMES)}"
            )
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if len(v) < 2:
                raise ValueError("keep at least 2 classes")
            if len(set(v)) != len(v):
                raise ValueError("lists a class twice")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.samples_per_class is not None and self.fraction is not None:
            raise ValueError("set samples_per_class or fraction, not both")
        if self.dataset is None:
            folders = (self.train, self.val, self.unlabeled)
            # still being validated: the frozen model's fields are set through __dict__
            self.__dict__["dataset"] = "folder" if any(f is not None for f in folders) else "digits"
        if self.dataset == "folder" and self.train is None and self.val is None:
            raise ValueError("dataset 'folder' needs data.train (an image folder)")
        if self.dataset != "folder" and (self.train is not None or self.val is not None):
            raise ValueError(f"dataset {self.dataset!r} has its own splits; drop data.train/val")
        return self


class OptimizerConfig(Section):
    """Any optimizer timm.optim.create_optimizer_v2 knows (sgd, adamw, lamb, ...)."""

    # default: adamw, or the adaptation method's reference optimizer where it has one (tent,
    # shot: tlkd/adapt/registry.py), with its lr and weight decay where those are unset
    name: str | None = None
    # default by optimizer family and start, scaled with the batch (tlkd/data/defaults.py):
    # adamw 2e-3 from random weights, 5e-4 from pretrained ones; sgd 0.05 / 0.01 (batch 64)
    lr: PositiveFloat | None = None
    # default by optimizer family: 0.05 for decoupled (Adam-like: adamw, lamb, lion, ...),
    # 5e-4 for decay added to the gradient (sgd, momentum, adam, rmsprop, ...)
    weight_decay: NonNegativeFloat | None = None
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)  # layer-wise LR decay


class SchedulerConfig(Section):
    """A timm scheduler (create_scheduler_v2), stepped every optimizer update."""

    name: Literal["cosine", "step", "multistep", "poly", "tanh", "none"] = "cosine"
    # default: about 5% of the epochs, 1 to 5 (none for 1-2 epochs or scheduler: none)
    warmup_epochs: NonNegativeInt | None = None
    warmup_lr: NonNegativeFloat = 1e-5
    min_lr: NonNegativeFloat = 0.0
    decay_epochs: PositiveInt = 30  # step
    decay_milestones: list[PositiveInt] = Field(default_factory=lambda: [30, 60])  # multistep
    decay_rate: PositiveFloat = 0.1


class TrainConfig(Section):
    """The training loop shared by every mode."""

    epochs: NonNegativeInt = 10  # 0 only for adapt.method: adabn (statistics, no training)
    batch_size: PositiveInt = 64
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    accum_steps: PositiveInt = 1  # gradient accumulation
    clip_grad: PositiveFloat | None = None  # max gradient norm
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    # auto: bf16 (or fp16) on cuda; on cpu the faster of fp32 and bf16, timed at the start
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"  # auto: on for cuda; timed on cpu
    # torch.compile the model's training forward (validation stays eager). auto: a fixed rule,
    # off on CPU, on for long CUDA runs (tlkd/engine/tune.py: compile_rule)
    compile: bool | Literal["auto"] = "auto"
    sync_bn: bool = False  # torchrun on GPUs: SyncBatchNorm across processes
    deterministic: bool = False  # torch.use_deterministic_algorithms
    log_every: PositiveInt = 50  # steps between plain log lines (when not on a terminal)
    val_every: PositiveInt = 1  # validate every N epochs (and always after the last)
    skip_nonfinite: NonNegativeInt = 0  # steps with a NaN/Inf loss to skip before stopping
    # LP-FT (Kumar et al. 2022, finetune): the new head alone trains for the first lp_epochs
    # epochs (backbone frozen, its BatchNorm in eval mode), then every layer; one optimizer and
    # schedule over all train.epochs
    lp_epochs: PositiveInt | None = None
    # L2-SP (Li et al. 2018, finetune): alpha/2 ||w - w0||^2 pulls the pretrained weights
    # (2+-dim tensors) toward their starting values; it replaces weight decay (default 0 then)
    l2sp: PositiveFloat | None = None
    l2sp_beta: NonNegativeFloat | None = None  # beta/2 ||w||^2 on the new head; default 0.01
    # whether a finished run keeps checkpoint.pt (to continue it with more epochs); default
    # (null): kept by a single run, dropped by the runs of a sweep. checkpoint.prev.pt, the
    # crash-safety copy, is always dropped when a run finishes.
    keep_checkpoint: bool | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        base = v.split(":")[0]
        if base not in ("auto", "cpu", "cuda", "mps") or (base in ("auto", "cpu") and ":" in v):
            raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps, got {v!r}")
        return v


class TeacherConfig(Section):
    """A frozen model whose outputs teach the student."""

    name: str
    # true: timm's hub weights; a weights file; or a tlkd run directory (its head and classes)
    pretrained: bool | str = True
    weight: PositiveFloat = 1.0  # share in the averaged soft targets of several teachers
    train_bn: bool = False  # BatchNorm in train mode (batch statistics) instead of eval mode
    kwargs: dict[str, ScalarArg | list[ScalarArg]] = Field(default_factory=dict)
    # how its forward pass runs (tlkd/distill/runtime.py): auto = the fastest of torch,
    # channels_last and (logits-only teachers, tlkd[export] installed, CPU) onnxruntime,
    # timed at the start
    runtime: Literal["auto", "torch", "channels_last", "onnxruntime"] = "auto"

    @field_validator("pretrained", mode="before")
    @classmethod
    def _pretrained(cls, v: Any) -> Any:
        if v == "auto":
            raise ValueError("a teacher needs its weights: true (timm's hub) or a path")
        return ModelConfig._pretrained(v)


LayerSpec = NonNegativeInt | str  # a feature_info stage index, or a module name


class _LossBase(Section):
    """One weighted term of the distillation objective. The loss types, their own keys and
    defaults come from the registry (tlkd/distill/registry.py): see ``LossConfig`` below."""

    type: str
    weight: NonNegativeFloat | None = None  # default: the loss type's reference weight
    teacher: NonNegativeInt | None = None  # which teacher; default: all (one ensemble)
    # features losses: default the last 3 stages (at, summed), or the hint layer (fitnet)
    student_layers: list[LayerSpec] | None = None
    teacher_layers: list[LayerSpec] | None = None

    @field_validator("type")
    @classmethod
    def _known(cls, v: str) -> str:
        return check_name(v, LOSSES, "loss type")

    @model_validator(mode="after")
    def _fits_type(self) -> _LossBase:
        entry = LOSSES[self.type]
        if getattr(self, "standardize", None) and entry.standardized:
            for key, value in entry.standardized.items():  # the authors' settings, if unset
                if getattr(self, key) is None:
                    self.__dict__[key] = value  # still validating: frozen fields via __dict__
        fill_params(self, entry, LOSS_PARAMS, f"loss type {self.type!r}")
        if self.weight is None:
            self.__dict__["weight"] = entry.weight
        if entry.inputs != "features":
            for key in ("student_layers", "teacher_layers"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} does not apply to loss type {self.type!r}")
        if entry.inputs == "labels" and self.teacher is not None:
            raise ValueError(f"loss type {self.type!r} learns the labels; it takes no teacher")
        if (self.student_layers is None) != (self.teacher_layers is None):
            raise ValueError("give student_layers and teacher_layers together")
        if self.student_layers is not None and len(self.student_layers) != len(self.teacher_layers):
            raise ValueError("student_layers and teacher_layers must pair up (same length)")
        return self


LOSS_PARAMS = param_fields(LOSSES)
# the registry's keys as optional fields (None: the loss type's default, or does not apply)
LossConfig = create_model(
    "LossConfig",
    __base__=_LossBase,
    __module__=__name__,
    **{key: (kind | None, None) for key, kind in LOSS_PARAMS.items()},
)


class TaskConfig(Section):
    """Multi-task distillation: one head of the student per task, taught by its teacher."""

    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    classes: list[str]
    teacher: NonNegativeInt


class CacheConfig(Section):
    """Teacher outputs stored once for ``views`` random views of every training image and
    reused by every run with the same teacher, data and augmentation (tlkd/distill/cache.py)."""

    views: PositiveInt = 8  # stored views per image; 1 is exact for deterministic augmentation
    seed: NonNegativeInt = 0  # of the stored views: keep it fixed to share a bank across seeds


class FunctionMatchingConfig(Section):
    """Function matching (Beyer et al. 2022; tlkd/distill/mixing.py): teacher and student see
    the same mixed images; defaults as big_vision's ``bit_i1k.py`` (mixup p=1.0)."""

    mixup_alpha: NonNegativeFloat = 1.0
    cutmix_alpha: NonNegativeFloat = 0.0
    switch_prob: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # CutMix's share when both

    @model_validator(mode="after")
    def _some_mixing(self) -> FunctionMatchingConfig:
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError("set mixup_alpha or cutmix_alpha above 0")
        return self


class DistillConfig(Section):
    losses: list[LossConfig] = Field(
        default_factory=lambda: [
            LossConfig(type="kd", weight=0.9, temperature=4.0),
            LossConfig(type="ce", weight=0.1),
        ],
        min_length=1,
    )
    tasks: list[TaskConfig] | None = None
    cache: CacheConfig | None = None  # omit: the teacher runs live on every batch
    function_matching: FunctionMatchingConfig | None = None  # omit: images as the loader gives

    @model_validator(mode="after")
    def _function_matching(self) -> DistillConfig:
        if self.function_matching is None:
            return self
        if self.cache is not None:
            raise ValueError(
                "function_matching needs the teacher live on the mixed images: remove "
                "distill.cache (stored outputs are of unmixed views; Beyer et al. 2022 also "
                "find precomputed teacher outputs hurt)"
            )
        for i, loss in enumerate(self.losses):
            entry = LOSSES[loss.type]
            if entry.inputs != "logits" or entry.needs_labels or entry.head != "class":
                raise ValueError(
                    f"losses.{i}: function_matching mixes images, so their labels mean nothing "
                    f"and only label-free logit losses apply (kd, as the paper; dist, hard), "
                    f"not {loss.type!r}"
                )
            unset = "temperature" not in loss.model_fields_set
            if "temperature" in entry.params and unset and not getattr(loss, "standardize", False):
                # the paper's kl at t=1 (big_vision bit_i1k.py), not the loss type's default;
                # standardize: true keeps its own base temperature (2, Sun et al. 2024)
                loss.__dict__["temperature"] = 1.0
        return self


class _AdaptBase(Section):
    """Domain adaptation (``tlkd adapt``): labelled source ``data.train``, unlabelled target
    ``data.unlabeled``, labelled target ``data.val``. The methods, their own keys and defaults
    come from the registry (tlkd/adapt/registry.py): see ``AdaptConfig`` below."""

    method: str
    weight: NonNegativeFloat = 1.0  # of the target term (pseudo-label CE, domain loss)
    source_val: Path | None = None  # a labelled source-domain val folder, scored every epoch

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        return check_name(v, METHODS, "adapt.method")

    @model_validator(mode="after")
    def _fits_method(self) -> _AdaptBase:
        fill_params(self, METHODS[self.method], ADAPT_PARAMS, f"adapt.method {self.method!r}")
        return self


ADAPT_PARAMS = param_fields(METHODS)
AdaptConfig = create_model(
    "AdaptConfig",
    __base__=_AdaptBase,
    __module__=__name__,
    **{key: (kind | None, None) for key, kind in ADAPT_PARAMS.items()},
)


class _PretrainBase(Section):
    """Self-supervised pretraining (``tlkd pretrain``) on ``data.unlabeled``. The methods,
    their own keys and defaults come from the registry (tlkd/ssl/registry.py)."""

    method: str = "simclr"
    knn_k: PositiveInt = 20  # the k-NN monitor on the labelled data.val (leave-one-out)

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        return check_name(v, SSL_METHODS, "pretrain.method")

    @model_validator(mode="after")
    def _fits_method(self) -> _PretrainBase:
        fill_params(self, SSL_METHODS[self.method], SSL_PARAMS, f"pretrain.method {self.method!r}")
        return self


SSL_PARAMS = param_fields(SSL_METHODS)
PretrainConfig = create_model(
    "PretrainConfig",
    __base__=_PretrainBase,
    __module__=__name__,
    **{key: (kind | None, None) for key, kind in SSL_PARAMS.items()},
)


class TrackingConfig(Section):
    """Experiment tracking (needs ``pip install 'tlkd[tracking]'``; tlkd/run/tracking.py)."""

    # true: an MLflow store in output_dir (mlflow.db, artifacts in mlartifacts/); or a
    # tracking URI (http://server:5000, sqlite:///path.db, postgresql://..., databricks)
    mlflow: bool | str = False
    tensorboard: bool = False  # TensorBoard event files in <run dir>/tensorboard
    experiment: str | None = None  # MLflow experiment; default: the run's (a sweep's: its own)

    @field_validator("mlflow")
    @classmethod
    def _uri(cls, v: bool | str) -> bool | str:
        if isinstance(v, str) and ":" not in v:
            raise ValueError(f"expected true, false or a tracking URI (scheme:...), got {v!r}")
        return v


class TuneConfig(Section):
    """``tlkd tune``: an Optuna search over config keys (tlkd/recipes/tune.py).

    ``space`` maps a dotted key to a list of values (categorical) or to one of
    ``{log: [low, high]}`` (float, log-uniform), ``{range: [low, high]}`` (float, uniform),
    ``{int: [low, high]}`` (integer, both ends included)."""

    space: dict[str, list[Any] | dict[str, list[float]]]
    metric: str = "best_val_top1"  # a number in the trial's summary.json
    direction: Literal["maximize", "minimize"] = "maximize"
    pruner: Literal["median", "none"] = "median"  # median: Optuna's MedianPruner on val
    sampler: Literal["tpe", "random"] = "tpe"
    trials: PositiveInt | None = None  # the study's total; --trials overrides

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("give at least one key to search")
        for key, spec in v.items():
            if isinstance(spec, list):
                if not spec:
                    raise ValueError(f"{key}: give at least one value")
                continue
            kinds = set(spec)
            if len(kinds) != 1 or not kinds <= {"log", "range", "int"}:
                raise ValueError(
                    f"{key}: expected a list of values or one of log: [low, high], "
                    f"range: [low, high], int: [low, high]; got {sorted(kinds)}"
                )
            ((kind, bounds),) = spec.items()
            if len(bounds) != 2 or not bounds[0] < bounds[1]:
                raise ValueError(f"{key}: {kind} needs [low, high] with low < high")
            if kind == "log" and bounds[0] <= 0:
                raise ValueError(f"{key}: log needs low > 0")
            if kind == "int" and not all(float(b).is_integer() for b in bounds):
                raise ValueError(f"{key}: int needs whole-number bounds")
        return v


class SweepConfig(Section):
    """``grid: {key.path: [values...]}``: every combination runs (``tlkd sweep``)."""

    grid: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"{key}: give at least one value")
        return v


class Config(Section):
    """One experiment: what to build, what to train on, how, and where the run goes."""

    experiment: str = Field("exp", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    sweep: SweepConfig | None = None  # tlkd sweep: the grid of overrides to run
    output_dir: Path = Path("runs")
    seed: NonNegativeInt = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    teacher: TeacherConfig | None = None  # distill: one teacher ...
    teachers: list[TeacherConfig] | None = Field(None, min_length=1)  # ... or several
    distill: DistillConfig | None = None
    adapt: AdaptConfig | None = None  # tlkd adapt
    pretrain: PretrainConfig | None = None  # tlkd pretrain
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tune: TuneConfig | None = None  # tlkd tune: the search space (ignored by other commands)
    # values tlkd chose at a run's first start for keys left unset ("data.image_size": 32, ...),
    # written by tlkd into the run's config.yaml; a rerun or a resume of it uses them
    resolved: dict[str, Any] = Field(default_factory=dict)

    @property
    def teacher_list(self) -> list[TeacherConfig]:
        if self.teachers is not None:
            return list(self.teachers)
        return [self.teacher] if self.teacher is not None else []

    def _transfer_methods(self) -> None:
        """train.lp_epochs (LP-FT) and train.l2sp (L2-SP): finetune's, and their own rules."""
        t = self.train
        used = [k for k in ("lp_epochs", "l2sp") if getattr(t, k) is not None]
        if t.l2sp_beta is not None and t.l2sp is None:
            raise ValueError("train.l2sp_beta is L2-SP's head weight: set train.l2sp too")
        if used and (self.adapt or self.pretrain or self.teacher_list or self.distill):
            raise ValueError(f"train.{used[0]} is a finetune method (tlkd finetune)")
        if t.l2sp is not None and t.optimizer.weight_decay:
            raise ValueError(
                "train.l2sp replaces weight decay (Li et al. 2018): set "
                "train.optimizer.weight_decay to 0 or leave it unset"
            )
        if self.model.lora is not None:
            self._lora(used)
        if t.lp_epochs is not None:
            if self.model.freeze != "none" or self.model.unfreeze_after is not None:
                raise ValueError(
                    "train.lp_epochs freezes the backbone itself: drop model.freeze and "
                    "model.unfreeze_after"
                )
            if t.lp_epochs >= t.epochs:
                raise ValueError(
                    f"train.lp_epochs ({t.lp_epochs}) must be below train.epochs ({t.epochs}): "
                    "LP-FT fine-tunes every layer after the linear probe"
                )

    def _lora(self, used: list[str]) -> None:
        """model.lora: finetune's; it decides what trains, so no other freezing or pull."""
        m = self.model
        if self.adapt or self.pretrain or self.teacher_list or self.distill:
            raise ValueError("model.lora is a finetune method (tlkd finetune)")
        if m.freeze != "none" or m.unfreeze_after is not None:
            raise ValueError(
                "model.lora freezes the backbone itself (only the adapters and the classifier "
                "train): drop model.freeze and model.unfreeze_after"
            )
        if used:
            raise ValueError(
                f"train.{used[0]} does not combine with model.lora, which keeps the backbone's "
                "weights frozen (drop one of them)"
            )

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.teacher is not None and self.teachers is not None:
            raise ValueError("give teacher or teachers, not both")
        n = len(self.teacher_list)
        if self.distill is not None:
            refs = [(f"distill.losses.{i}", t.teacher) for i, t in enumerate(self.distill.losses)]
            refs += [
                (f"distill.tasks.{i}", t.teacher) for i, t in enumerate(self.distill.tasks or [])
            ]
            for key, ref in refs:
                if ref is not None and n and ref >= n:
                    raise ValueError(f"{key}.teacher: no teacher {ref} (there are {n})")
        if self.train.epochs == 0 and (
            self.adapt is None or not METHODS[self.adapt.method].without_training
        ):
            allowed = ", ".join(k for k, e in METHODS.items() if e.without_training)
            raise ValueError(
                f"train.epochs: must be at least 1 (0, no training, is for adapt.method: {allowed})"
            )
        self._transfer_methods()
        if self.model.unfreeze_after is not None:
            if self.model.freeze == "none":
                raise ValueError("model.unfreeze_after needs model.freeze (nothing is frozen)")
            if self.model.unfreeze_after >= self.train.epochs:
                raise ValueError(
                    f"model.unfreeze_after ({self.model.unfreeze_after}) must be below "
                    f"train.epochs ({self.train.epochs})"
                )
        return self
