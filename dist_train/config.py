"""Typed configuration: one dataclass per component, nested in :class:`TrainConfig`.

Owns: the schema and defaults, validation in ``__post_init__``, loading YAML with ``--set a.b=c``
overrides, and writing the resolved config. Precedence: command line > YAML > defaults. The
generic machinery (type conversion by the declared type, unknown-key errors, builder keyword
checks, override parsing) is :mod:`dist_train.config_schema`. An unknown key raises naming
its dotted path and the closest valid key, inside ``backbone.params`` and ``head.params`` too:
their keys are checked against the registered builder's keyword arguments (``backbones`` and
``heads`` registries) and, for ``head.params``, :data:`CENTER_LOSS_PARAMS`; so are those of
``distill.teacher.params``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# ConfigError lives in core/ so the data layer can subclass it; users import it from here.
from core.errors import ConfigError
from dist_train.config_schema import (
    check_builder_params,
    check_choice,
    closest,
    from_dict,
    parse_override,
    set_dotted,
    to_dict,
)

__all__ = [
    "AMP_MODES",
    "CENTER_LOSS_PARAMS",
    "CENTER_LOSS_UPDATES",
    "OPTIMIZER_NAMES",
    "BackboneConfig",
    "DEVICE_CHOICES",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "HeadConfig",
    "OptimConfig",
    "PartialFCConfig",
    "SchedulerConfig",
    "TeacherConfig",
    "TrainConfig",
    "closest",
    "from_dict",
    "load_config",
    "parse_override",
    "save_config",
    "to_dict",
]

CENTER_LOSS_PARAMS: dict[str, type] = {
    "center_loss_weight": float,  # λ of the sharded center loss added to the objective; 0: off
    "center_loss_update": str,  # one of CENTER_LOSS_UPDATES
    "center_loss_alpha": float,  # rate α of the "alpha" update rule
    "center_loss_lr_scale": float,  # centres' learning rate relative to optim.lr ("gradient")
    "center_loss_centers_dtype": str,  # storage of the centres, as partial_fc.weight_dtype
    "center_loss_state_dtype": str,  # storage of their optimizer state, as partial_fc.state_dtype
}
"""Keys of ``head.params`` read by :mod:`dist_train.losses` (the center loss), not passed to the
head builder, with their types."""
CENTER_LOSS_UPDATES = ("gradient", "alpha")
"""Values of ``head.params.center_loss_update``."""
STORAGE_DTYPES = ("float32", "bfloat16", "float16")
"""Values of ``partial_fc.weight_dtype``/``state_dtype`` and the center loss's dtype keys."""
OPTIMIZER_NAMES = ("sgd", "adam", "adamw")
"""Values of ``optim.name``: the rules of :func:`dist_train.optim.make_optimizer`."""
AMP_MODES = ("none", "bf16", "fp16")
"""Values of ``amp``: the keys of :data:`dist_train.precision.AMP_DTYPES`."""
DEVICE_CHOICES = ("auto", "cuda", "cpu")
"""Values of ``device``: what :func:`dist_train.device_setup.resolve_device_type` accepts."""


@dataclass
class DataConfig:
    """Training data and its on-the-fly augmentation."""

    root: str = "data/synthetic"
    """Dataset directory: train.rec/train.idx (InsightFace layout) or an identity/*.jpg folder."""
    format: str = "auto"
    """"auto", "recordio", "folder" or "list" (a `path,label` file given as root)."""
    num_classes: int = 0
    """Number of identities; 0 derives it from the data (a non-zero value must agree)."""
    num_images: int = 0
    """Number of training images; 0 derives it from the data (a non-zero value must agree)."""
    image_size: int = 112
    """Side of the square network input in pixels."""
    batch_size: int = 128
    """Images per rank per micro-step (B_local)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    prefetch_factor: int = 4
    """Batches each loader worker prepares ahead (its shared-memory ring holds this + 2)."""
    sampler: str = "shuffle"
    """"shuffle", "identity_cap", "identity_ratio" or "m_per_class"."""
    max_images_per_identity: int = 200
    """identity_cap sampler: at most this many images of each identity per epoch."""
    identity_ratio: float = 1.0
    """identity_ratio sampler: fraction of each identity's images that is used."""
    m_per_class: int = 2
    """m_per_class sampler: images of each class in a batch."""
    hflip: bool = True
    """Random horizontal flip with probability 0.5."""
    random_resized_crop: bool = False
    """Random crop of an area fraction in [crop_area_min, 1] then resize to image_size."""
    crop_area_min: float = 0.8
    """Lower bound of the random crop's area fraction."""
    color_jitter: float = 0.0
    """Brightness/contrast/saturation factors uniform in [1 - j, 1 + j] (0 disables)."""
    center_crop: int = 0
    """Center crop to this side before resizing (0 disables)."""
    low_light: bool = False
    """Apply the low-light transform x <- uint8(clip(sqrt(x) * 2))."""
    mean: float = 0.5
    """Normalisation mean (on [0, 1] pixels), applied on the device."""
    std: float = 0.5
    """Normalisation std (on [0, 1] pixels), applied on the device."""

    def __post_init__(self) -> None:
        check_choice("data.format", self.format, ("auto", "recordio", "folder", "list"))
        check_choice(
            "data.sampler",
            self.sampler,
            ("shuffle", "identity_cap", "identity_ratio", "m_per_class"),
        )
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ConfigError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if not 0.0 < self.identity_ratio <= 1.0:
            raise ConfigError(f"data.identity_ratio must be in (0, 1], got {self.identity_ratio}")
        if not 0.0 < self.crop_area_min <= 1.0:
            raise ConfigError(f"data.crop_area_min must be in (0, 1], got {self.crop_area_min}")
        if self.std <= 0:
            raise ConfigError(f"data.std must be > 0, got {self.std}")


@dataclass
class BackboneConfig:
    """The network image -> embedding."""

    name: str = "iresnet50"
    """Registered backbone name (see `python launch/model_info.py --list`)."""
    embedding_size: int = 512
    """Embedding dimension D."""
    checkpointing: str = "none"
    """Gradient checkpointing granularity: "none", "stage" or "block"."""
    channels_last: bool = False
    """Use the channels_last memory format."""
    dropout: float = 0.0
    """Dropout before the embedding layer."""
    init_weights: str = ""
    """Initialise from a file: a training checkpoint, exported weights or a state dict."""
    freeze_stages: int = 0
    """Number of leading stages (stem counts as stage 0) whose parameters are frozen."""
    freeze_bn: bool = False
    """Every BatchNorm layer normalises with, and keeps, its running statistics during
    training (evaluation mode; its affine weight and bias still train unless frozen). For
    fine-tuning on small batches, and for weights imported with folded BatchNorm (identity
    statistics), which batch statistics would change."""
    params: dict = field(default_factory=dict)
    """Extra keyword arguments for the backbone builder (its keyword names, e.g. input_size;
    embedding_size and checkpointing come from the fields above)."""

    def __post_init__(self) -> None:
        check_choice("backbone.checkpointing", self.checkpointing, ("none", "stage", "block"))
        import backbones  # on first use: importing this module needs no torch

        self.params = check_builder_params(
            "backbone",
            backbones.BACKBONES,
            self.name,
            self.params,
            section_fields=("embedding_size", "checkpointing"),
        )


@dataclass
class HeadConfig:
    """The loss: a margin head used inside Partial FC, or a metric loss on the global batch."""

    name: str = "arcface"
    """Registered head name (heads.names())."""
    params: dict = field(default_factory=dict)
    """Keyword arguments for the head builder, e.g. {s: 64.0, m: 0.5} (num_classes is filled
    from the data), plus the center-loss keys of CENTER_LOSS_PARAMS."""

    def __post_init__(self) -> None:
        import heads  # on first use: importing this module needs no torch

        self.params = check_builder_params(
            "head", heads.HEADS, self.name, self.params, extra=CENTER_LOSS_PARAMS
        )
        if "center_loss_update" in self.params:
            check_choice(
                "head.params.center_loss_update",
                self.params["center_loss_update"],
                CENTER_LOSS_UPDATES,
            )
        for key in ("center_loss_centers_dtype", "center_loss_state_dtype"):
            if key in self.params:
                check_choice(f"head.params.{key}", self.params[key], STORAGE_DTYPES)


@dataclass
class PartialFCConfig:
    """The sharded classifier."""

    sample_rate: float = 1.0
    """Fraction of each rank's classes kept per step (all positives always kept)."""
    update: str = "sparse"
    """"sparse": only sampled rows change; "dense": partial_fc_v2 semantics."""
    weight_dtype: str = "float32"
    """Storage dtype of the weight shard: "float32", "bfloat16" or "float16"."""
    state_dtype: str = "float32"
    """Storage dtype of the classifier's optimizer rows (SGD momentum, Adam/AdamW moments):
    "float32", "bfloat16" or "float16" (SGD only: Adam's second moment underflows fp16).
    Half precision is updated in fp32 a chunk at a time, stochastically rounded back."""
    lr_scale: float = 1.0
    """Learning rate of the classifier relative to optim.lr."""

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_rate <= 1.0:
            raise ConfigError(f"partial_fc.sample_rate must be in (0, 1], got {self.sample_rate}")
        check_choice("partial_fc.update", self.update, ("sparse", "dense"))
        for key in ("weight_dtype", "state_dtype"):
            check_choice(f"partial_fc.{key}", getattr(self, key), STORAGE_DTYPES)


@dataclass
class OptimConfig:
    """Optimizer of the backbone and the classifier."""

    name: str = "sgd"
    """"sgd", "adam" or "adamw"."""
    lr: float = 0.1
    """Peak learning rate (after warm-up), for the global batch."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    weight_decay: float = 5e-4
    """Weight decay (decoupled for AdamW)."""
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    """Adam/AdamW betas."""
    eps: float = 1e-8
    """Adam/AdamW epsilon."""
    no_decay_norm_bias: bool = False
    """Exclude normalisation parameters and biases from weight decay."""
    grad_clip_norm: float = 0.0
    """Clip the backbone's gradient norm to this value (0 disables)."""
    backbone_lr_scale: float = 1.0
    """Learning rate of the backbone relative to optim.lr (e.g. 0.1 when fine-tuning a
    pretrained backbone under a new head; partial_fc.lr_scale sets the classifier's, a metric
    head's parameters use optim.lr). Fixed for a run: a resumed run keeps its checkpoint's."""

    def __post_init__(self) -> None:
        check_choice("optim.name", self.name, OPTIMIZER_NAMES)
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas must have two values, got {self.betas}")
        if not self.backbone_lr_scale > 0:
            raise ConfigError(
                f"optim.backbone_lr_scale must be > 0, got {self.backbone_lr_scale} "
                "(freeze parameters with backbone.freeze_stages)"
            )


@dataclass
class SchedulerConfig:
    """Learning-rate schedule, stepped every optimizer step."""

    name: str = "poly"
    """"poly" (warm-up then polynomial decay), "cosine_restarts", "step" or "constant"."""
    warmup_epochs: float = 0.0
    """Linear warm-up length in epochs (fractions allowed)."""
    warmup_steps: int = 0
    """Linear warm-up length in optimizer steps (overrides warmup_epochs when > 0)."""
    power: float = 2.0
    """poly: exponent of the decay (1 - t)^power."""
    cycle_epochs: float = 10.0
    """cosine_restarts: cycle length in epochs."""
    min_lr: float = 0.0
    """cosine_restarts/poly: floor of the learning rate."""
    milestones_epochs: list = field(default_factory=list)
    """step: epochs at which the learning rate is multiplied by gamma."""
    gamma: float = 0.1
    """step: decay factor."""

    def __post_init__(self) -> None:
        check_choice("scheduler.name", self.name, ("poly", "cosine_restarts", "step", "constant"))


@dataclass
class EvalConfig:
    """Verification during and after training."""

    targets: list = field(default_factory=list)
    """Verification sets: .bin files and/or labelled pair-list CSVs, and/or IJB folders (``DIR``
    holding loose_crop/ and meta/, or ``IJBB:DIR`` / ``IJBC:DIR``; slow: see ijb_every_epochs
    and test_targets)."""
    every_steps: int = 0
    """Evaluate every N optimizer steps (0: only at the end and, if every_epoch, per epoch)."""
    every_epoch: bool = False
    """Evaluate at the end of every epoch."""
    ijb_every_epochs: int = 0
    """IJB folders among ``targets`` (minutes of extraction each) are scored at the end of the
    run and, with N > 0, at the end of every N-th epoch; the other evaluations (at_start,
    every_steps, every_epoch) leave them out."""
    at_start: bool = False
    """Also evaluate the untrained (or initial) network before the first step, as a baseline."""
    batch_size: int = 128
    """Images per forward pass during evaluation."""
    flip: bool = True
    """Flip test-time augmentation (embedding of image + embedding of its mirror)."""
    low_light: bool = False
    """Also apply the low-light transform to the evaluation images."""
    best_metric: str = ""
    """Keep a best checkpoint by this metric, e.g. "val/eer" (lower is better), "lfw/accuracy" or
    "mean/accuracy" (the mean over the standard five sets among the targets)."""
    test_targets: list = field(default_factory=list)
    """Test sets scored once after training with best_model.pt (the final weights when no
    best was kept); results in metrics_test.json. Same forms as ``targets`` (an IJB folder is
    best placed here: it is evaluated once)."""


@dataclass
class CheckpointConfig:
    """Training-state checkpoints."""

    every_steps: int = 0
    """Save every N optimizer steps (0 disables step checkpoints)."""
    at_epoch_end: bool = True
    """Save at the end of every epoch."""
    keep_last: int = 3
    """Number of step/epoch checkpoints kept (older ones are deleted)."""
    resume: str = "auto"
    """"auto" continues the run in output_dir, "never" moves it aside; "" or a checkpoint file."""


@dataclass
class TeacherConfig:
    """The frozen teacher network of knowledge distillation (:mod:`dist_train.distill`)."""

    name: str = ""
    """Registered backbone name of the teacher; "" turns distillation off."""
    weights: str = ""
    """The teacher's weights file (any format ``backbones.load_weights`` reads: a model.pt, a
    training checkpoint, .safetensors, an imported file); read again at every start and resume,
    never stored in checkpoints."""
    params: dict = field(default_factory=dict)
    """Extra keyword arguments for the teacher's builder (e.g. width_mult, input_size); its
    embedding size is backbone.embedding_size (the student's)."""
    amp: bool = True
    """Run the teacher under the run's autocast (``amp``); false: full precision."""


@dataclass
class DistillConfig:
    """Knowledge distillation: a frozen teacher's embeddings as targets for the student's.

    The term added to the loss is the global-batch mean over samples of
    ``l2_weight * ||s - t||^2 / D + cosine_weight * (1 - cos(s, t))`` (s: the student's
    embedding, t: the teacher's, D: the embedding size).
    """

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    l2_weight: float = 1.0
    """Weight of the mean squared difference of the embeddings (per dimension)."""
    cosine_weight: float = 0.0
    """Weight of one minus the cosine similarity of the embeddings."""

    @property
    def enabled(self) -> bool:
        """A teacher is configured."""
        return bool(self.teacher.name)

    def __post_init__(self) -> None:
        for key in ("l2_weight", "cosine_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"distill.{key} must be >= 0, got {getattr(self, key)}")
        t = self.teacher
        if not t.name:
            if t.weights or t.params:
                raise ConfigError(
                    "distill.teacher.weights/params are set but distill.teacher.name is empty"
                )
            return
        if not t.weights:
            raise ConfigError(
                f"distill.teacher.name={t.name!r} needs distill.teacher.weights (a weights file)"
            )
        if self.l2_weight == 0 and self.cosine_weight == 0:
            raise ConfigError("distill.l2_weight and distill.cosine_weight are both 0: set one > 0")
        if "embedding_size" in t.params:
            raise ConfigError(
                "distill.teacher.params.embedding_size: the teacher's embedding size is "
                "backbone.embedding_size (embeddings are compared directly, without projection)"
            )
        import backbones  # on first use: importing this module needs no torch

        t.params = check_builder_params("distill.teacher", backbones.BACKBONES, t.name, t.params)


@dataclass
class TrainConfig:
    """A whole training run."""

    output_dir: str = "runs/default"
    """Run directory: resolved config, logs, TensorBoard events, checkpoints, weights."""
    seed: int = 0
    """Seed of every random number generator."""
    num_epochs: float = 1.0
    """Training length in epochs (fractions allowed)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: derived from num_epochs)."""
    amp: str = "none"
    """Mixed precision: "none", "bf16" or "fp16" (fp16 uses a GradScaler)."""
    grad_accum_steps: int = 1
    """Micro-steps accumulated per optimizer step (the loss is scaled by 1/k)."""
    log_every_steps: int = 10
    """Console/TensorBoard log line every N optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under output_dir/tensorboard."""
    deterministic: bool = False
    """Deterministic algorithms (slower; for exact-resume tests)."""
    max_skipped_steps: int = 10
    """Stop the run after this many consecutive non-finite steps."""
    dist_timeout_s: float = 600.0
    """Collective timeout in seconds: how long a rank waits in a collective for a peer that is
    alive but stuck (a peer that fails ends the job at once). Must exceed the longest wait of
    one rank on another (a checkpoint write, the first open of a large dataset)."""
    device: str = "auto"
    """"auto" (CUDA when torch has it, else CPU), "cuda" (fail at start without CUDA) or "cpu";
    with "auto", GPUs allocated by the launcher but invisible to torch also fail at start
    (see dist_train.device_setup)."""
    tf32: bool = True
    """On CUDA, fp32 matmuls and convolutions use TF32 tensor cores (the classifier's cosine
    GEMMs); margin and softmax stay fp32. False: strict IEEE fp32."""
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    partial_fc: PartialFCConfig = field(default_factory=PartialFCConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        check_choice("amp", self.amp, AMP_MODES)
        check_choice("device", self.device, DEVICE_CHOICES)
        if self.grad_accum_steps < 1:
            raise ConfigError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.dist_timeout_s <= 0:
            raise ConfigError(f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        if self.num_epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("one of num_epochs or max_steps must be > 0")
        if self.partial_fc.state_dtype == "float16" and self.optim.name != "sgd":
            raise ConfigError(
                f"partial_fc.state_dtype=float16 is refused with optim.name={self.optim.name}: "
                "Adam's second moment (g² ≈ 1e-8 … 1e-12) underflows fp16; use bfloat16"
            )


# --------------------------------------------------------------------------------------------
# Building dataclasses from nested dicts


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then ``--set`` overrides, validated.

    Args:
        path: YAML file (``None`` for the defaults).
        overrides: ``["section.key=value", ...]``.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            try:
                loaded = yaml.safe_load(f)
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    return from_dict(TrainConfig, data)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Writes the resolved config as YAML (loadable by :func:`load_config`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
