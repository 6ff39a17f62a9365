"""Typed configuration of one run (plain dataclasses; registered in Hydra's ConfigStore by ``experiments``).

Every config group of ``configs/`` maps to one field here, so a typo or a wrong type fails at compose time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qat.data.synthetic import DEMO_DEFAULTS
from qat.ptq.config import PtqConfig
from qat.quant.config import QuantConfig
from qat.quant.schedule import QuantSchedule
from qat.train.loop import OptimConfig


@dataclass
class ModelConfig:
    arch: str = "mobilenet_v2"
    width_mult: float = 1.0
    resolution: int = 224
    weights: str | None = None  # skips float training: a .pt/.pth file or torchvision IMAGENET1K_V1, _V2, DEFAULT
    # running-statistics momentum of every batch norm; null keeps the architecture's (torchvision v3: 0.01)
    bn_momentum: float | None = None


@dataclass
class DemoDataConfig:
    num_classes: int = DEMO_DEFAULTS["num_classes"]
    train_per_class: int = DEMO_DEFAULTS["train_per_class"]
    val_per_class: int = DEMO_DEFAULTS["val_per_class"]
    image_size: int = DEMO_DEFAULTS["image_size"]
    seed: int = DEMO_DEFAULTS["seed"]


@dataclass
class DataConfig:
    name: str = "demo"  # demo (generated on first use) | imagefolder (ImageNet or any ImageFolder tree)
    root: str | None = None
    batch_size: int = 64
    eval_batch_size: int = 250
    workers: int = 0
    train_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.5  # probability of a horizontal flip of each training image; 0: never (digits, text)
    resize_ratio: float = 0.875
    # decode once: auto holds a split in memory when its pixels fit in qat.data.memory.IN_MEMORY_MAX_MB (the demo
    # set; ImageNet streams), true always, false streams from disk with per-image PIL transforms (as before)
    in_memory: str = "auto"
    # quick sweeps: evaluate on a class-stratified subset of this many validation images, drawn with
    # val_subset_seed (the same images whatever the run's seed; recorded in data.val_subset); null: the whole set
    val_max_images: int | None = None
    val_subset_seed: int = 0
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)


@dataclass
class QuantGroup(QuantConfig):
    precision: str = "int8"  # float | int8 (integer model; grids of 2-8 bits run in 8-bit containers)
    calibration_batches: int = 4  # batches that initialise activation ranges before fine-tuning


@dataclass
class TrainConfig:
    float_epochs: int = 15  # float training when no float weights are given
    qat_epochs: int = 3  # simulated-quantization fine-tuning
    qat_lr: float = 0.005
    threads: int | None = None  # torch threads for training (default: all cores)
    cache_float: bool = True  # reuse float weights trained by an identical earlier run
    checkpoint_every_steps: int = 0  # also checkpoint mid-epoch every N steps (0: each epoch only); exact resume
    device: str = "auto"  # auto (GPU when visible) | cpu | cuda
    keep_best: bool = True  # evaluate after each epoch and keep <phase>_best.pt (the run's result is the last)
    amp: str = "none"  # mixed precision of the forward pass: none | fp16 (GPU) | bf16; fake quant stays float32
    channels_last: bool = True  # train in NHWC (faster CPU and cuDNN steps); NCHW under CPU autocast, see engine
    # torch.compile the training forward: on an H200 the QAT step fell from 3.8-4.0x to 2.0x the float step
    # (results/gpu); each phase's first steps compile (tens of seconds); off by default (CPU gains unmeasured)
    compile: bool = False
    # torch.compile's mode when train.compile: default | reduce-overhead (replays CUDA graphs; the quantizers
    # update their buffers in place for it) | max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "default"


@dataclass
class LatencyConfig:
    engine: str = "auto"  # auto: the target's first engine | torch_native (+ backend) | an int8 engine name
    backend: str = "x86"
    threads: int = 1
    batch: int = 1
    warmup: int = 10
    repeats: int = 50
    min_time_s: float = 0.5
    # engines that evaluate the integer model on the validation set (fidelity against the simulated model);
    # "reference" is the integer-only executor; the latency engine is always evaluated
    eval_engines: list[str] = field(default_factory=lambda: ["reference", "onnxruntime"])
    # where the integer-only reference evaluates: auto (the run's device: a GPU when training uses one) | cpu |
    # cuda; the other engines are CPU-only and say so in the record (fidelity.engines.<name>.device)
    eval_device: str = "auto"


@dataclass
class TargetConfig:
    """The deployment target (``qat.targets``): its engines and the grid their kernels need."""

    name: str = "auto"  # auto (from the host's CPU flags) | x86_vnni | x86_avx2 | arm | generic
    avx2_grid: str = "weights7"  # x86_avx2: weights7 (|q_w| <= 64) | acts7 (activations in [0, 127])
    diagnostic_images: int = 256  # validation images for the 16-bit pair-sum saturation diagnostic (0: off)


@dataclass
class LoggerConfig:
    """Experiment tracking (``qat.tracking``); the record is written locally whatever the logger."""

    name: str = "none"  # none | csv (<run_dir>/metrics.csv) | wandb (<run_dir>/wandb/)
    project: str = "qat"
    entity: str | None = None
    mode: str = "offline"  # wandb: offline (no network; `wandb sync` later) | online | disabled
    group: str | None = None  # default: the sweep directory in a multirun, the tag in a single run
    tags: list[str] = field(default_factory=list)
    log_every: int = 1  # training steps between logged steps


@dataclass
class RunConfig:
    tag: str = "default"  # free label of the study, copied into the record as "experiment"
    seed: int = 0
    # qat: calibrate, then fine-tune with simulated quantization; ptq: post-training methods of `ptq` only
    # (qat.ptq.apply.run_ptq), no fine-tuning. With quant=float either gives the float baseline.
    method: str = "qat"
    cache_dir: str | None = None  # default $QAT_CACHE or ~/.cache/qat
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantGroup = field(default_factory=QuantGroup)
    schedule: QuantSchedule = field(default_factory=QuantSchedule)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ptq: PtqConfig = field(default_factory=PtqConfig)  # used when method=ptq
