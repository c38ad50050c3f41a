"""Training configuration: frozen dataclasses, read from TOML with `--set section.key=value` overrides.

A config file has top-level keys (`output_dir`, `seed`, `device`, `mixed_precision`) and one table per section:
`[model]` (what is trained), `[data]`, `[loss]` (flow-matching timesteps, caption dropout), `[optim]`,
`[schedule]` (steps and learning rate), `[checkpoint]`, `[logging]` and `[distributed]` (DDP / FSDP2 under
torchrun). Unknown keys anywhere are errors that name the key. Relative paths are relative to the working directory,
not to the config file.

Example (see `configs/train/` for complete ones):

    output_dir = "runs/tiny"
    [model.arch]          # or `preset = "sana-600m-1024"` in [model]
    hidden_size = 32
    [data]
    source = "synthetic"
    [schedule]
    max_steps = 100
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sana.dataclass_io import from_dict
from sana.errors import ConfigError
from sana.models.dcae import DCAEConfig
from sana.models.transformer import TRANSFORMER_PRESETS, TransformerConfig

try:  # Python 3.11+
    import tomllib as _toml
except ModuleNotFoundError:  # Python 3.10: the tomli backport, if installed
    try:
        import tomli as _toml  # type: ignore[no-redef]
    except ModuleNotFoundError:
        _toml = None


class TrainTask(enum.Enum):
    TRANSFORMER = "transformer"  # the diffusion transformer, with the flow-matching loss (sana.train.loop)
    TEXT_ENCODER = "text_encoder"  # a small Gemma-2 decoder + BPE tokenizer, as a causal LM on the captions
    AUTOENCODER = "autoencoder"  # a DC-AE that reconstructs the images (sana.train.autoencoder)


class DataSource(enum.Enum):
    FOLDER = "folder"  # images with NAME.txt / NAME.json captions beside them, encoded on the fly
    WEBDATASET = "webdataset"  # WebDataset tar shards of images + captions, encoded on the fly
    CACHE = "cache"  # a folder written by `build_cache` (`sana cache`): DC-AE latents and text embeddings
    SYNTHETIC = "synthetic"  # fixed random latents and text embeddings: a smoke test that needs no files


class OptimizerKind(enum.Enum):
    CAME = "came"
    ADAMW = "adamw"


class LRSchedule(enum.Enum):
    CONSTANT = "constant"  # linear warmup, then constant (the released configs)
    COSINE = "cosine"  # linear warmup, then half a cosine down to min_lr_ratio * lr at max_steps


class MixedPrecision(enum.Enum):
    BF16 = "bf16"  # bf16 autocast on CUDA (weights, gradients and optimizer state stay fp32); ignored on the CPU
    NO = "no"  # fp32 everywhere


class Strategy(enum.Enum):
    AUTO = "auto"  # "ddp" when torchrun started more than one process, else "none"
    NONE = "none"  # one process, no process group
    DDP = "ddp"  # every process holds the whole model; gradients are averaged (all-reduce) after the backward
    FSDP2 = "fsdp2"  # weights, gradients and optimizer state sharded across the processes (torch fully_shard)


class DType(enum.Enum):
    BF16 = "bf16"
    FP32 = "fp32"


class LogBackend(enum.Enum):
    AUTO = "auto"  # TensorBoard when torch.utils.tensorboard imports, else JSONL
    TENSORBOARD = "tensorboard"
    JSONL = "jsonl"  # one JSON object a line in OUTPUT_DIR/log.jsonl


class ExportLayout(enum.Enum):
    NATIVE = "native"  # one .safetensors file with the config in its metadata
    DIFFUSERS = "diffusers"  # a folder with config.json + diffusion_pytorch_model.safetensors


SPRINT_UNSUPPORTED = (
    "Sana-Sprint models (guidance embedding) are distilled with sCM + LADD, which this trainer does not implement"
)

# Linear layers of a Sana block (native names) that LoRA adapts by default: attention, cross-attention and FFN.
DEFAULT_LORA_TARGETS = ("attn.qkv", "attn.proj", "cross_attn.q", "cross_attn.kv", "cross_attn.proj")


@dataclass(frozen=True)
class TextArchConfig:
    """A Gemma-2 decoder (transformers' Gemma2Config) for `task = "text_encoder"`; the tokenizer is trained too."""

    # Byte-level BPE vocabulary, special tokens (<pad> <eos> <bos> <unk>) included.
    vocab_size: int = 2048
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    max_position_embeddings: int = 1024

    def __post_init__(self):
        sizes = (self.vocab_size, self.hidden_size, self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim)
        if min(sizes) < 1 or self.intermediate_size < 1:
            raise ConfigError(f"[model.text_arch] sizes must be >= 1, got {self}")
        if self.vocab_size < 260:
            raise ConfigError(
                f"[model.text_arch] vocab_size must be >= 260 (256 bytes + 4 specials), got {self.vocab_size}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.max_position_embeddings < 16:
            raise ConfigError(f"max_position_embeddings must be >= 16, got {self.max_position_embeddings}")


@dataclass(frozen=True)
class ModelConfig:
    """The model to train and the frozen models around it.

    task "transformer": `preset`, `arch` or `init_from` (plus `autoencoder` / `text_encoder` for raw images and
    validation). task "text_encoder": `text_arch`. task "autoencoder": `autoencoder_arch` (or `init_from`, a DC-AE).
    """

    # A TRANSFORMER_PRESETS name (e.g. "sana-600m-1024"); "" when `arch` gives the architecture instead.
    preset: str = ""
    # An explicit architecture ([model.arch] table of TransformerConfig fields); exclusive with `preset`.
    arch: TransformerConfig | None = None
    # Weights to start from (fine-tuning): a diffusers transformer or pipeline folder, an original NVlabs
    # .pth/.safetensors, a native file, or a Hugging Face repo id of one. "" trains from the reference init.
    init_from: str = ""
    # DC-AE weights (local path or repo id): needed for `data.source = "folder"` and for validation images.
    autoencoder: str = ""
    # Gemma-2 text encoder (a diffusers pipeline folder/repo with tokenizer/ and text_encoder/, or a Gemma
    # folder/repo): needed for `data.source = "folder"` and for validation images.
    text_encoder: str = ""
    # Prepend Sana's Complex Human Instruction to captions, as the reference trains and samples.
    chi: bool = True
    # Recompute block activations in the backward pass: less memory, about 30% more compute.
    gradient_checkpointing: bool = False
    # LoRA rank; 0 trains every weight. With LoRA only the adapters (and nothing else) are trained.
    lora_rank: int = 0
    # LoRA scale numerator: the update is (lora_alpha / lora_rank) B A; 0 means lora_alpha = lora_rank.
    lora_alpha: float = 0.0
    # Module-name suffixes of the Linear layers that get adapters (native names, see sana.models.transformer).
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    # task "text_encoder": the Gemma-2 decoder to train ([model.text_arch] table).
    text_arch: TextArchConfig | None = None
    # task "autoencoder": the DC-AE to train ([model.autoencoder_arch] table of DCAEConfig fields).
    autoencoder_arch: DCAEConfig | None = None

    def __post_init__(self):
        if self.preset and self.arch is not None:
            raise ConfigError("`preset` and [model.arch] are exclusive")
        if self.preset and self.preset not in TRANSFORMER_PRESETS:
            raise ConfigError(f"preset {self.preset!r} unknown; known: {', '.join(sorted(TRANSFORMER_PRESETS))}")
        arch = self.transformer_config()
        if arch is not None and arch.guidance_embeds:
            raise ConfigError(SPRINT_UNSUPPORTED)
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise ConfigError(f"lora_rank={self.lora_rank} and lora_alpha={self.lora_alpha} must be >= 0")
        if self.lora_rank and not self.lora_targets:
            raise ConfigError("lora_rank > 0 needs at least one entry in lora_targets")

    def transformer_config(self) -> TransformerConfig | None:
        """The architecture named by `preset` or `arch`; None when it comes from `init_from`'s checkpoint."""
        if self.arch is not None:
            return self.arch
        return TRANSFORMER_PRESETS[self.preset] if self.preset else None


@dataclass(frozen=True)
class DataConfig:
    """Where training pairs come from and how they are batched."""

    # "folder" (images + captions), "webdataset" (tar shards of them), "cache" (a `build_cache` folder) or
    # "synthetic" (no files).
    source: DataSource = DataSource.FOLDER
    # The image folder, the folder (or glob) of .tar shards, or the cache folder; unused for synthetic data.
    path: str = ""
    # Base resolution of the aspect-ratio buckets: 512/1024/2048/4096 use Sana's tables, other sizes the 1024
    # table scaled. Synthetic latents are (resolution / 32) a side.
    resolution: int = 1024
    # Images per micro-batch and process. Every batch comes from one aspect-ratio bucket. The global batch of an
    # optimizer update is batch_size x number of processes x optim.grad_accum.
    batch_size: int = 1
    # Drop each bucket's last incomplete batch of an epoch (fixed batch shapes) instead of training on it.
    drop_last: bool = False
    # DataLoader worker processes (0 loads in the training process).
    num_workers: int = 2
    # CLIP-score caption sampler (reference section 9.2): captions scoring below this are not sampled ...
    clip_threshold: float = 25.0
    # ... and the rest are sampled with probability proportional to score ** (1 / max(temperature, 0.01)).
    clip_temperature: float = 0.1
    # Synthetic data: number of fixed samples and text tokens per sample.
    synthetic_samples: int = 16
    synthetic_text_length: int = 8
    # task "text_encoder": tokens per training sequence (longer ones are cut) and the fraction of sequences that
    # start with the Complex Human Instruction (as TextEncoder feeds prompts when model.chi is on).
    text_length: int = 512
    chi_probability: float = 0.5
    # task "autoencoder": images held out of training to measure the reconstruction PSNR (the last ones of the folder).
    holdout: int = 256

    def __post_init__(self):
        if self.text_length < 8 or not 0.0 <= self.chi_probability <= 1.0 or self.holdout < 0:
            raise ConfigError(
                f"text_length={self.text_length} must be >= 8, chi_probability={self.chi_probability} in [0, 1], "
                f"holdout={self.holdout} >= 0"
            )
        if self.resolution < 32 or self.resolution % 32:
            raise ConfigError(f"resolution must be a positive multiple of 32, got {self.resolution}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1, num_workers >= 0")
        if self.clip_temperature <= 0:
            raise ConfigError(f"clip_temperature must be > 0, got {self.clip_temperature}")
        if self.synthetic_samples < 1 or self.synthetic_text_length < 1:
            raise ConfigError("synthetic_samples and synthetic_text_length must be >= 1")


@dataclass(frozen=True)
class LossConfig:
    """Rectified-flow loss (reference section 5): sigma = shift(sigmoid(N(logit_mean, logit_std)))."""

    # SD3 resolution shift s: sigma' = s sigma / (1 + (s - 1) sigma). 3.0 typical, 4.0 for 600M@1024, 6.0 for 4K.
    flow_shift: float = 3.0
    # Mean and standard deviation of the logit-normal timestep density.
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # Probability of replacing a caption by the null embedding (classifier-free guidance training).
    caption_dropout: float = 0.1
    # task "autoencoder": loss = |x' - x| + gradient_weight |grad x' - grad x| + l2_weight (x' - x)^2 (means over
    # pixels; grad = horizontal and vertical pixel differences: penalises blurred edges).
    gradient_weight: float = 1.0
    l2_weight: float = 0.0

    def __post_init__(self):
        if self.gradient_weight < 0 or self.l2_weight < 0:
            raise ConfigError(f"gradient_weight={self.gradient_weight} and l2_weight={self.l2_weight} must be >= 0")
        if self.flow_shift <= 0 or self.logit_std <= 0:
            raise ConfigError(f"flow_shift={self.flow_shift} and logit_std={self.logit_std} must be > 0")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer, gradient handling and EMA (defaults: the released configs, reference section 9.4)."""

    # "came" (the reference's) or "adamw".
    optimizer: OptimizerKind = OptimizerKind.CAME
    # Peak learning rate (after warmup).
    lr: float = 1e-4
    # CAME: (beta1, beta2, beta3); AdamW: (beta1, beta2). Empty: the optimizer's defaults, CAME (0.9, 0.999,
    # 0.9999), AdamW (0.9, 0.999).
    betas: tuple[float, ...] = ()
    # CAME: (eps1, eps2); AdamW: (eps,). Empty: CAME (1e-30, 1e-16), AdamW (1e-10,).
    eps: tuple[float, ...] = ()
    # Decoupled weight decay (CAME 0 in the released configs; the reference's AdamW default is 0.03).
    weight_decay: float = 0.0
    # CAME's update clipping threshold d (RMS of the normalised update is clipped to d).
    clip_threshold: float = 1.0
    # Clip the global gradient norm to this before the update (0 turns it off). Released configs: 0.1.
    grad_clip: float = 0.1
    # Micro-batches per optimizer update (per process: global batch = data.batch_size x processes x grad_accum).
    grad_accum: int = 1
    # EMA decay of the trained weights (0 keeps no EMA).
    ema_decay: float = 0.9999
    # Abort after this many updates skipped for a non-finite loss (the reference aborts after 20).
    max_nan_updates: int = 20

    def __post_init__(self):
        if self.lr <= 0 or self.weight_decay < 0 or self.clip_threshold <= 0 or self.grad_clip < 0:
            raise ConfigError(
                f"lr={self.lr} and clip_threshold={self.clip_threshold} must be > 0, "
                f"weight_decay={self.weight_decay} and grad_clip={self.grad_clip} >= 0"
            )
        n_betas, n_eps = (3, 2) if self.optimizer is OptimizerKind.CAME else (2, 1)
        if self.betas and len(self.betas) != n_betas:
            raise ConfigError(f"{self.optimizer.value} takes {n_betas} betas, got {list(self.betas)}")
        if self.eps and len(self.eps) != n_eps:
            raise ConfigError(f"{self.optimizer.value} takes {n_eps} eps value(s), got {list(self.eps)}")
        if any(not 0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be in [0, 1), got {list(self.betas)}")
        if self.grad_accum < 1 or not 0.0 <= self.ema_decay < 1.0 or self.max_nan_updates < 0:
            raise ConfigError(
                f"grad_accum={self.grad_accum} must be >= 1, ema_decay={self.ema_decay} in [0, 1), "
                f"max_nan_updates={self.max_nan_updates} >= 0"
            )


@dataclass(frozen=True)
class ScheduleConfig:
    """Length of the run and the learning-rate schedule (a pure function of the update index)."""

    # Optimizer updates in the whole run (a resumed run continues up to this).
    max_steps: int = 10_000
    # Linear warmup from 0 over this many updates (released configs: 2000).
    warmup_steps: int = 2000
    # "constant" or "cosine" after the warmup.
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    # Cosine: the learning rate at max_steps, as a fraction of `optim.lr`.
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if self.max_steps < 1 or self.warmup_steps < 0:
            raise ConfigError(f"max_steps={self.max_steps} must be >= 1, warmup_steps >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class CheckpointConfig:
    """Full training state saved under OUTPUT_DIR/checkpoints/step-NNNNNNNN/ and the final weights."""

    # Save every this many updates (and on SIGTERM, and at the end). 0 saves only on SIGTERM and at the end.
    every_steps: int = 500
    # Keep only the newest K checkpoints (0 keeps all).
    keep_last: int = 3
    # "auto": continue from the newest checkpoint in OUTPUT_DIR/checkpoints if there is one; "": start fresh;
    # else the path of a checkpoint folder to continue from.
    resume: str = "auto"
    # At the end, write the trained transformer (EMA weights when kept, LoRA merged) to OUTPUT_DIR/final.
    export: bool = True
    # Layout of the exported transformer: "native" (one .safetensors) or "diffusers" (a folder).
    export_layout: ExportLayout = ExportLayout.NATIVE

    def __post_init__(self):
        if self.every_steps < 0 or self.keep_last < 0:
            raise ConfigError(f"every_steps={self.every_steps} and keep_last={self.keep_last} >= 0")


@dataclass(frozen=True)
class LoggingConfig:
    """Metrics, the progress bar and validation images."""

    # Log metrics (loss, lr, grad norm, steps/s, images/s, GPU memory) every this many updates.
    every_steps: int = 10
    # "auto" (TensorBoard if it imports, else JSONL), "tensorboard" or "jsonl".
    backend: LogBackend = LogBackend.AUTO
    # Show a tqdm progress bar.
    progress: bool = True
    # Render validation images every this many updates (0: never), to OUTPUT_DIR/samples/step-NNNNNNNN/.
    validation_every: int = 0
    # Fixed prompts for validation images; image i uses seed validation_seed + i.
    validation_prompts: tuple[str, ...] = ()
    validation_seed: int = 0
    # Sampler steps and guidance of the validation images (Flow-DPM-Solver).
    validation_steps: int = 20
    validation_guidance: float = 4.5
    # Render with the EMA weights (when an EMA is kept) rather than the live ones.
    validation_use_ema: bool = True

    def __post_init__(self):
        if self.every_steps < 1 or self.validation_every < 0 or self.validation_steps < 1:
            raise ConfigError(
                f"every_steps={self.every_steps} and validation_steps={self.validation_steps} must be "
                f">= 1, validation_every={self.validation_every} >= 0"
            )
        if self.validation_every and not self.validation_prompts:
            raise ConfigError("validation_every > 0 needs validation_prompts")


@dataclass(frozen=True)
class DistributedConfig:
    """Data parallelism over the processes that torchrun starts, one per GPU:

        torchrun --nproc-per-node 8 -m sana train configs/train/sana-600m-1024.toml

    Every process trains on its own share of the batches, so an optimizer update sees the global batch
    data.batch_size x processes x optim.grad_accum. N processes with grad_accum A make the same updates (the same
    batches, the same noise; equal up to float rounding) as one process with grad_accum N x A.
    """

    # "auto" (ddp when launched with WORLD_SIZE > 1, else none), "none", "ddp" or "fsdp2".
    strategy: Strategy = Strategy.AUTO
    # FSDP2: dtype the gathered weights compute in ("bf16" or "fp32"); the sharded master weights, their gradients
    # and the optimizer state stay fp32.
    param_dtype: DType = DType.BF16
    # FSDP2: dtype of the gradients' reduce-scatter between the processes.
    reduce_dtype: DType = DType.FP32
    # FSDP2: free each block's gathered weights after its forward and gather them again for its backward (less
    # memory, more communication).
    reshard_after_forward: bool = True
    # Seconds a process waits for the others at a collective (rank 0 downloading the models first, checkpoints,
    # validation images) before the run fails.
    timeout_s: int = 1800

    def __post_init__(self):
        if self.timeout_s < 1:
            raise ConfigError(f"timeout_s must be >= 1, got {self.timeout_s}")


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run."""

    # What is trained: "transformer" (flow matching), "text_encoder" (causal LM + tokenizer) or "autoencoder" (DC-AE).
    task: TrainTask = TrainTask.TRANSFORMER
    # Checkpoints, logs, samples and the exported model go here.
    output_dir: str = "runs/sana"
    # Seeds the initial weights, the data order, the caption sampler and the loss's noise.
    seed: int = 0
    # "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    # "bf16" (autocast on CUDA) or "no".
    mixed_precision: MixedPrecision = MixedPrecision.BF16
    model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="sana-600m-1024"))
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self):
        if not self.output_dir:
            raise ConfigError("output_dir must not be empty")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        self._check_task()
        if self.data.source is not DataSource.SYNTHETIC and not self.data.path:
            raise ConfigError(f"[data] source = {self.data.source.value!r} needs `path`")
        if self.task is not TrainTask.TRANSFORMER:
            return
        if self.logging.validation_every and not (self.model.autoencoder and self.model.text_encoder):
            raise ConfigError("[logging] validation images need [model] autoencoder and text_encoder")
        if self.data.source in (DataSource.FOLDER, DataSource.WEBDATASET) and not (
            self.model.autoencoder and self.model.text_encoder
        ):
            raise ConfigError(f'[data] source = "{self.data.source.value}" needs [model] autoencoder and text_encoder')
        if self.distributed.strategy is Strategy.FSDP2 and self.model.lora_rank:
            raise ConfigError(
                '[distributed] strategy = "fsdp2" does not train LoRA adapters (they are small): use "ddp"'
            )

    def _check_task(self) -> None:
        m = self.model
        if self.task is TrainTask.TRANSFORMER:
            if not (m.preset or m.arch is not None or m.init_from):
                raise ConfigError("[model]: give `preset`, an [model.arch] table or `init_from`")
            return
        name = self.task.value
        if self.distributed.strategy not in (Strategy.AUTO, Strategy.NONE):
            raise ConfigError(f'task "{name}" trains in one process: [distributed] strategy must be "auto" or "none"')
        if self.data.source is not DataSource.FOLDER:
            raise ConfigError(f'task "{name}" reads an image folder: [data] source must be "folder"')
        if m.preset or m.arch is not None or m.lora_rank:
            raise ConfigError(f'task "{name}": `preset`, [model.arch] and LoRA are for task "transformer"')
        if self.task is TrainTask.TEXT_ENCODER and m.text_arch is None:
            raise ConfigError('task "text_encoder" needs a [model.text_arch] table')
        if self.task is TrainTask.AUTOENCODER and m.autoencoder_arch is None and not m.init_from:
            raise ConfigError('task "autoencoder" needs a [model.autoencoder_arch] table or `init_from`')
        if self.logging.validation_every:
            raise ConfigError(f'task "{name}": validation images are for task "transformer" (set validation_every = 0)')


@dataclass(frozen=True)
class _TopLevel:
    """TrainConfig's scalar fields, converted from TOML before the sections are attached."""

    task: TrainTask = TrainConfig.task
    output_dir: str = TrainConfig.output_dir
    seed: int = TrainConfig.seed
    device: str = TrainConfig.device
    mixed_precision: MixedPrecision = TrainConfig.mixed_precision


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "distributed": DistributedConfig,
}


def _read_toml(path: Path) -> dict[str, Any]:
    if _toml is None:
        raise ConfigError(f"{path}: reading TOML on Python < 3.11 needs the `tomli` package (pip install tomli)")
    try:
        with open(path, "rb") as f:
            return _toml.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    except _toml.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e


def parse_override(text: str) -> tuple[list[str], Any]:
    """ "section.key=value" -> (["section", "key"], value). The value is a TOML literal (1e-4, true, "x", [1, 2]);
    a value that is not one is taken as a bare string (`data.path=/data/images`)."""
    key, sep, raw = text.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or not all(parts):
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    if _toml is None:
        raise ConfigError("parsing overrides on Python < 3.11 needs the `tomli` package (pip install tomli)")
    try:
        value = _toml.loads(f"v = {raw.strip()}")["v"]
    except _toml.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of the config table `data` with each "a.b.c=value" override set (tables created as needed)."""
    data = _deep_copy(data)
    for text in overrides:
        parts, value = parse_override(text)
        table = data
        for i, part in enumerate(parts[:-1]):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is a value, not a table")
        table[parts[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    return {k: _deep_copy(v) for k, v in data.items()} if isinstance(data, dict) else data


def config_from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    """Build a TrainConfig from a parsed table; unknown keys raise ConfigError naming the key and section."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    # Section by section, so that an error names the section: "train.toml [optim]: unknown key(s) ['lrr']".
    sections = {
        name: from_dict(cls, data[name], where=f"{where} [{name}]") for name, cls in _SECTIONS.items() if name in data
    }
    top = from_dict(_TopLevel, {k: v for k, v in data.items() if k not in _SECTIONS}, where=where)
    if top.task is not TrainTask.TRANSFORMER and "model" not in sections:
        sections["model"] = ModelConfig()  # not the default transformer preset
    try:
        return TrainConfig(**{f.name: getattr(top, f.name) for f in dataclasses.fields(top)}, **sections)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a TOML training config (None: all defaults) and apply `section.key=value` overrides."""
    data = _read_toml(Path(path)) if path is not None else {}
    where = str(path) if path is not None else "config"
    return config_from_dict(apply_overrides(data, list(overrides)), where=where)
