"""The training config: the schema of `conf/train.yaml` and its groups (model, data, peft, optim, hardware, logger).

Each group's dataclass checks its own values (`checks`): what OmegaConf's types cannot say, with the key named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

Check = tuple[str, bool, str]  # (config key, whether it holds, what is wrong when it does not)



class ModelSource(str, Enum):
    hub = "hub"  # a model id on the Hugging Face Hub, or a local save_pretrained folder
    bundled = "bundled"  # the small GPT-2 pretrained by convobot.training.pretrain, shipped in the package (offline default)
    random = "random"  # a small GPT-2 built from a GPT2Config with random init (model=tiny_random)
    run = "run"  # what an earlier run computes (init_from), saved in this run dir as base_model/


class DataSource(str, Enum):
    hub = "hub"
    local = "local"
    bundled = "bundled"


class DataFormat(str, Enum):
    alpaca = "alpaca"  # instruction / input / output columns, the Alpaca prompt
    messages = "messages"  # OpenAI-style {"messages": [{"role", "content"}, ...]}, the chat template
    sharegpt = "sharegpt"  # {"conversations": [{"from": "human" | "gpt" | "system", "value"}, ...]}
    preference = "preference"  # a prompt with a chosen and a rejected answer (DPO, ORPO, KTO): data/preferences.py
    unpaired = "unpaired"  # a prompt, one completion and a label: desirable or not (KTO)


CONVERSATION_FORMATS = (DataFormat.messages, DataFormat.sharegpt)
PREFERENCE_FORMATS = (DataFormat.preference, DataFormat.unpaired)


class Stage(str, Enum):
    sft = "sft"  # supervised fine-tuning on instruction rows (TRL's SFTTrainer)
    dpo = "dpo"  # direct preference optimisation on chosen/rejected pairs (DPOTrainer)
    orpo = "orpo"  # odds-ratio preference optimisation: SFT and preference in one loss, no reference (ORPOTrainer)
    kto = "kto"  # Kahneman-Tversky optimisation on answers labelled desirable or not (KTOTrainer)
    grpo = "grpo"  # group relative policy optimisation: sampled answers rewarded by exact match (GRPOTrainer)


# The data formats each stage trains on.
STAGE_FORMATS = {
    Stage.sft: (DataFormat.alpaca, *CONVERSATION_FORMATS),
    Stage.dpo: (DataFormat.preference,),
    Stage.orpo: (DataFormat.preference,),
    Stage.kto: PREFERENCE_FORMATS,
    Stage.grpo: (DataFormat.alpaca, *CONVERSATION_FORMATS),
}


class PeftMethod(str, Enum):
    lora = "lora"
    full = "full"


class BadRowPolicy(str, Enum):
    error = "error"
    skip = "skip"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class LossHead(str, Enum):
    chunked = "chunked"  # TRL's chunked log-prob head: never holds batch x seq x vocab logits (GPUs)
    plain = "plain"  # logits and cross-entropy on the labelled positions only: LoRA steps ~1.3x faster on CPU


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class ModelConfig:
    name: str = "tiny-gpt2"
    source: ModelSource = ModelSource.bundled
    # Tokenizer: "bundled" (shipped with convobot) or a hub id / local folder.
    tokenizer: str = "bundled"
    revision: Optional[str] = None
    attn_implementation: str = "sdpa"
    # Only read for source=random.
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 256
    # GPT-2's 0.02 suits n_embd=768; a tiny model needs ~1/sqrt(n_embd), or its frozen tied
    # embeddings cap the logit range a LoRA adapter can reach.
    initializer_range: float = 0.02
    init_seed: int = 0
    # GPT-2's attn/resid/embd dropout while training; null keeps the checkpoint's (0.1 for GPT-2).
    dropout: Optional[float] = None
    # The base model's licence (a Hub licence id): the model card's, unless the data's binds the weights.
    license: Optional[str] = None


@dataclass
class DataConfig:
    name: str = "bundled"
    source: DataSource = DataSource.bundled
    # hub dataset id (source=hub) or a json/jsonl/csv/parquet file (source=local).
    path: Optional[str] = None
    # alpaca rows, or conversations (messages / sharegpt) trained through the chat template on the assistant turns.
    format: DataFormat = DataFormat.alpaca
    split: str = "train"
    max_rows: Optional[int] = None
    # Size of the held-out split: a fraction of the rows (< 1) or a row count (>= 1).
    eval_size: float = 0.05
    max_eval_rows: Optional[int] = None
    split_seed: int = 0
    max_length: int = 256
    completion_only: bool = True
    on_bad_row: BadRowPolicy = BadRowPolicy.error
    # Only read for source=bundled.
    num_rows: int = 3000
    generation_seed: int = 0
    # The data's licence (a Hub licence id); a non-commercial one binds the weights trained on it.
    license: Optional[str] = None

    def checks(self) -> list[Check]:
        return [
            ("data.max_rows", self.max_rows is None or self.max_rows > 0, "must be > 0, or null for all rows"),
            ("data.max_length", self.max_length > 8, "must be > 8"),
            ("data.eval_size", self.eval_size > 0, "must be > 0"),
            # The data group's `path: ???` does not survive the merge onto the schema's null: checked here.
            ("data.path", self.source == DataSource.bundled or bool(self.path),
             f"is required for data.source={self.source.value}: data.path=..."),
        ]

    @property
    def origin(self) -> str:
        """Where the rows come from: the file or hub id, or the bundled tasks' config name."""
        return self.path or self.name


@dataclass
class PeftConfig:
    # The conf/peft option (lora, dora, rslora, qlora, full).
    name: str = "lora"
    method: PeftMethod = PeftMethod.lora
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])
    fan_in_fan_out: bool = True
    bias: str = "none"
    # DoRA: the update split into magnitude and direction (peft's use_dora).
    use_dora: bool = False
    # rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r, so larger ranks keep learning (use_rslora).
    use_rslora: bool = False
    # QLoRA: nf4 (or fp4) keeps the frozen base's linear layers in 4 bits (bitsandbytes); null: the base as is.
    quantization: Optional[str] = None
    # Quantise the 4-bit blocks' scales too (QLoRA's double quantisation: ~0.4 bits per weight less).
    double_quant: bool = True

    @property
    def adapter(self) -> bool:
        """Training saves an adapter (LoRA and its variants), not the whole model."""
        return self.method == PeftMethod.lora

    @property
    def method_name(self) -> str:
        """What the settings train, whatever the option was called: full, lora, dora or rslora, with a "q" in front
        when the base is held in 4 bits (qlora, qdora). Metrics, reports and model cards use it."""
        if not self.adapter:
            return "full"
        kind = "dora" if self.use_dora else "rslora" if self.use_rslora else "lora"
        return ("q" + kind) if self.quantization else kind


@dataclass
class OptimConfig:
    # "auto" (bitsandbytes 8-bit AdamW on CUDA, torch's fused AdamW on CPU; see convobot/optim.py) or a
    # transformers `optim` name: adamw_bnb_8bit, paged_adamw_8bit, adamw_torch, adamw_torch_fused, ...
    name: str = "auto"
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "linear"
    max_grad_norm: float = 1.0


@dataclass
class HardwareConfig:
    name: str = "cpu"
    device: Device = Device.auto
    precision: Precision = Precision.fp32
    batch_size: int = 16
    # Rows per batch when generating answers (exact match, samples) and in the Trainer's own evaluation.
    eval_batch_size: int = 32
    # Padded tokens per batch when scoring held-out perplexity (convobot/scoring.py).
    eval_tokens: int = 4096
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    vram_gb: Optional[float] = None
    # A CUDA run whose memory plan (convobot.plan) exceeds vram_gb is refused unless this is true.
    allow_over_budget: bool = False
    dataloader_workers: int = 0
    torch_compile: bool = False
    loss_head: LossHead = LossHead.plain
    # CPU: keep freed memory in the heap rather than page-faulting each step's tensors in again (cpu_memory.py).
    tune_malloc: bool = True


@dataclass
class TrainLoopConfig:
    epochs: float = 3.0
    max_steps: int = -1
    logging_steps: int = 10
    # Evaluate every N steps during training; null = only at the end.
    eval_steps: Optional[int] = None
    save_steps: int = 500
    # Retention: keep the newest K checkpoints (null = all). keep_best also keeps the lowest-eval-loss one
    # and makes it the saved adapter/model; it needs eval_steps, and save_steps a multiple of it.
    keep_last: Optional[int] = 2
    keep_best: bool = False
    packing: bool = False
    group_by_length: bool = False
    # Multi-process runs (torchrun / accelerate launch): null = the Trainer's choice (nccl on GPUs, gloo on CPU).
    ddp_backend: Optional[str] = None
    # Each rank appends the hash and token count of every sample it trains on to samples/rank<N>.jsonl.
    log_samples: bool = False
    # NEFTune: uniform noise of this scale (alpha / sqrt(length * width)) on the input embeddings while training.
    neftune_alpha: Optional[float] = None


@dataclass
class ReportConfig:
    # Exact-match on this many held-out rows (tasks with checkable answers only).
    exact_match_rows: int = 200
    # Sample generations printed in the summary.
    samples: int = 3
    max_new_tokens: int = 32
    # Score the untrained model too, for the before/after table.
    before: bool = True
    # Answer this many held-out rows (greedy, max_new_tokens) and score the answers against the references (BLEU,
    # chrF, ROUGE, exact match: needs the eval extra); the answers go to the run dir's predictions.jsonl.
    generate_metrics: bool = False
    generate_rows: int = 32


class Tracker(str, Enum):
    none = "none"
    tensorboard = "tensorboard"
    mlflow = "mlflow"
    wandb = "wandb"


@dataclass
class LoggerConfig:
    """Where a run's config, step metrics, results and files are tracked (conf/logger/)."""
    name: Tracker = Tracker.none
    # The MLflow experiment / W&B project the runs go to.
    experiment: str = "convobot"
    # MLflow: null is a SQLite store in outputs/ where the run is launched (sqlite:///<cwd>/outputs/mlflow.db).
    tracking_uri: Optional[str] = None
    # MLflow: where a new experiment keeps artifacts (null: outputs/mlflow-artifacts beside the store).
    artifact_location: Optional[str] = None
    # W&B: offline (no network; `wandb sync` uploads later), online, or disabled.
    mode: str = "offline"


@dataclass
class StageConfig:
    """The training objective (conf/stage/): SFT, or a preference / reward stage through TRL's trainer for it."""
    name: Stage = Stage.sft
    # DPO, KTO, GRPO: the KL weight that holds the policy near the reference; ORPO: the odds-ratio loss's weight.
    beta: float = 0.1
    # TRL's loss_type for the stage (DPO: sigmoid, ipo, hinge, ...; KTO: kto, apo_zero_unpaired; GRPO: dapo, grpo,
    # dr_grpo, ...); null: TRL's default.
    loss_type: Optional[str] = None
    # DPO: the weight of an SFT loss on the chosen answers beside the preference loss (RPO, TRL's loss_type
    # [..., "sft"]): it keeps the chosen answers likely while the margin grows; 0: the preference loss alone.
    sft_weight: float = 0.0
    # DPO, KTO: the reference's log-probabilities computed once before training instead of at every step.
    precompute_ref_log_probs: bool = False
    # KTO: the weights of desirable and undesirable answers' losses (raise the rarer kind's).
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # GRPO: answers sampled per prompt, their tokens and temperature; the reward is exact match with the reference.
    num_generations: int = 4
    max_completion_length: int = 32
    temperature: float = 1.0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    # A finished run dir to start from (SFT, then DPO on top): the model it computes (its adapter merged) becomes
    # this run's base, saved in the run dir; model=... is then that run's.
    init_from: Optional[str] = None
    seed: int = 0
    # false | true (newest checkpoint in this run dir, else an error) | auto (the same, else start fresh)
    # | a run dir or checkpoint-N path. See convobot/resume.py.
    resume: Any = False
    # Replace an earlier run in the same run dir (its checkpoints, adapter and logs go); refused without it.
    overwrite: bool = False
    experiment_name: str = "default"

    def checks(self) -> list[Check]:
        peft, loop, hw, model = self.peft, self.train, self.hardware, self.model
        return self.data.checks() + [
            ("peft.r", peft.r > 0, "must be > 0"),
            ("train.max_steps", loop.max_steps > 0 or loop.max_steps == -1,
             "must be > 0, or -1 to train for train.epochs"),
            ("train.epochs", loop.max_steps > 0 or loop.epochs > 0, "must be > 0 (or set train.max_steps)"),
            ("hardware.eval_tokens", hw.eval_tokens > 0, "must be > 0"),
            ("peft.dropout", 0 <= peft.dropout < 1, "must be in [0, 1)"),
            ("model.dropout", model.dropout is None or 0 <= model.dropout < 1, "must be in [0, 1), or null"),
            ("peft.target_modules", bool(peft.target_modules), "must name at least one module"),
            ("optim.lr", self.optim.lr > 0, "must be > 0"),
            ("hardware.batch_size", hw.batch_size > 0, "must be > 0"),
            ("hardware.grad_accum", hw.grad_accum > 0, "must be > 0"),
            ("train.keep_last", loop.keep_last is None or loop.keep_last > 0, "must be > 0, or null to keep all"),
            ("train.eval_steps", not loop.keep_best or bool(loop.eval_steps),
             "is required by train.keep_best=true (evaluation picks the best checkpoint)"),
            ("train.save_steps", not (loop.keep_best and loop.eval_steps) or loop.save_steps % loop.eval_steps == 0,
             "must be a multiple of train.eval_steps when train.keep_best=true"),
            ("resume", isinstance(self.resume, bool) or (isinstance(self.resume, str) and bool(self.resume.strip())),
             "must be true, false, auto, or a run dir / checkpoint path"),
            ("report.max_new_tokens", self.report.max_new_tokens > 0, "must be > 0"),
            ("report.generate_rows", self.report.generate_rows > 0, "must be > 0"),
            ("train.neftune_alpha", loop.neftune_alpha is None or loop.neftune_alpha > 0, "must be > 0, or null"),
            *self.stage_checks(),
        ]

    def stage_checks(self) -> list[Check]:
        stage, formats = self.stage, STAGE_FORMATS[self.stage.name]
        generations = self.hardware.batch_size * self.hardware.grad_accum
        return [
            ("data.format", self.data.format in formats,
             f"stage={stage.name.value} trains on data.format {'|'.join(f.value for f in formats)}, got "
             f"{self.data.format.value}" + (" (data=bundled_preferences is the offline preference data)"
                                            if DataFormat.preference in formats else "")),
            ("train.packing", stage.name == Stage.sft or not self.train.packing, "is for stage=sft only"),
            ("stage.beta", stage.beta >= 0, "must be >= 0"),
            ("stage.sft_weight", stage.sft_weight >= 0, "must be >= 0"),
            ("stage.num_generations", stage.num_generations > 1, "must be > 1: GRPO compares answers to one prompt"),
            ("stage.max_completion_length", stage.max_completion_length > 0, "must be > 0"),
            ("hardware.batch_size", stage.name != Stage.grpo or generations % stage.num_generations == 0,
             f"times hardware.grad_accum ({generations}) must be a multiple of stage.num_generations "
             f"({stage.num_generations}): GRPO samples each prompt's answers in one batch"),
            ("init_from", self.init_from is None or bool(str(self.init_from).strip()), "must be a run dir, or null"),
        ]

