"""Typed schemas for every command's config, and the one place a composed config is checked.

Hydra composes `conf/train.yaml` and its groups (convobot-train, convobot-plan) or a file of
`conf/commands/` (merge, eval, export, chat); `validate()` merges the result onto these dataclasses,
so a misspelt key (`peft.rr=8`), a wrong type (`peft.r=eight`) or a missing value (`run_dir=???`)
fails at start-up with the full key in the message instead of deep inside the work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from convobot.errors import ConfigError

# The Hydra configs ship inside the package, so an installed wheel has them (the repo's conf/ links here).
CONF_DIR = Path(__file__).resolve().parent / "conf"
COMMANDS_CONF_DIR = CONF_DIR / "commands"


class ModelSource(str, Enum):
    hub = "hub"  # a model id on the Hugging Face Hub, or a local save_pretrained folder
    bundled = "bundled"  # the small GPT-2 pretrained by convobot.pretrain, shipped in the package (offline default)
    random = "random"  # a small GPT-2 built from a GPT2Config with random init (model=tiny_random)


class DataSource(str, Enum):
    hub = "hub"
    local = "local"
    bundled = "bundled"


class DataFormat(str, Enum):
    alpaca = "alpaca"  # instruction / input / output columns, the Alpaca prompt
    messages = "messages"  # OpenAI-style {"messages": [{"role", "content"}, ...]}, the chat template
    sharegpt = "sharegpt"  # {"conversations": [{"from": "human" | "gpt" | "system", "value"}, ...]}


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


@dataclass
class PeftConfig:
    # The conf/peft option (lora, dora, rslora, full): what reports and trackers call the method.
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


@dataclass
class ReportConfig:
    # Exact-match on this many held-out rows (tasks with checkable answers only).
    exact_match_rows: int = 200
    # Sample generations printed in the summary.
    samples: int = 3
    max_new_tokens: int = 32
    # Score the untrained model too, for the before/after table.
    before: bool = True


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
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    # false | true (newest checkpoint in this run dir, else an error) | auto (the same, else start fresh)
    # | a run dir or checkpoint-N path. See convobot/resume.py.
    resume: Any = False
    # Replace an earlier run in the same run dir (its checkpoints, adapter and logs go); refused without it.
    overwrite: bool = False
    experiment_name: str = "default"


# ----------------------------------------------------------------------------- the release commands


@dataclass
class GenerationOptions:
    """Sampling settings for chat and for a release bundle's generation_config.json (temperature 0 = greedy)."""
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.1


@dataclass
class MergeConfig:
    """convobot-merge (conf/commands/merge.yaml)."""
    run_dir: str = MISSING
    output_dir: str = MISSING
    overwrite: bool = False
    # Max |logit difference| allowed between the adapter model, the merged model and the reloaded bundle.
    tolerance: float = 1e-4
    # Held-out rows the logit checks (a) and (c) run on.
    verify_rows: int = 8
    # Score base and merged perplexity on the first perplexity_rows held-out rows (merge_report.json, model card).
    perplexity: bool = True
    perplexity_rows: int = 16
    # Padded tokens per scoring batch (convobot/scoring.py).
    batch_tokens: int = 4096
    # Written to the bundle's generation_config.json.
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    # Model card licence; null: derived from the base model's and the data's licences where known.
    license: Optional[str] = None
    export_onnx: bool = False
    # A hub repo id to upload the bundle to (only when given; needs `huggingface-cli login`).
    push_to_hub: Optional[str] = None
    private: bool = True


class EvalRows(str, Enum):
    heldout = "heldout"
    all = "all"


@dataclass
class SlidingConfig:
    enabled: bool = True
    # Tokens per window; null: the model's context length.
    window: Optional[int] = None
    # Tokens between window starts (each window scores only its last `stride` tokens); null: window // 2.
    stride: Optional[int] = None


@dataclass
class EvalConfig:
    """convobot-eval (conf/commands/eval.yaml)."""
    # A merged bundle / model folder, a run dir or a run's adapter/.
    model: Optional[str] = None
    run_dir: Optional[str] = None
    # A conf/data config (data=alpaca_gpt4, data=local data.path=rows.jsonl); null: the run's heldout.jsonl.
    data: Optional[DataConfig] = None
    # With data: its seeded held-out split (what training held out), or all of its rows.
    rows: EvalRows = EvalRows.heldout
    # Score several models of run_dir side by side: any of base, adapter, merged.
    compare: list[str] = field(default_factory=list)
    max_rows: Optional[int] = None
    # Tokens kept per row; null: the run's / data config's data.max_length (capped at the context).
    max_length: Optional[int] = None
    # Padded tokens per scoring batch (convobot/scoring.py).
    batch_tokens: int = 4096
    sliding: SlidingConfig = field(default_factory=SlidingConfig)
    # Largest relative perplexity difference allowed between adapter and merged models.
    tolerance: float = 1e-4
    # Also write the report as JSON here.
    output: Optional[str] = None
    # Check a bundle against its SHA256SUMS before loading it.
    verify_checksums: bool = True


@dataclass
class ExportConfig:
    """convobot-export-onnx (conf/commands/export.yaml)."""
    # A merged bundle (config.json + model.safetensors), e.g. from convobot-merge.
    model: str = MISSING
    # null: <model>/onnx, inside the bundle (its SHA256SUMS and merge_report.json are refreshed).
    output_dir: Optional[str] = None
    overwrite: bool = False
    tolerance: float = 1e-4
    # null: the exporter's default opset.
    opset: Optional[int] = None
    # Check the bundle against its SHA256SUMS before exporting (and only re-sign it if it matched).
    verify_checksums: bool = True


@dataclass
class ChatConfig:
    """convobot-chat (conf/commands/chat.yaml)."""
    model: str = MISSING
    # One instruction to answer, then exit; null: an interactive session.
    prompt: Optional[str] = None
    # The Alpaca input that goes with `prompt` (optional).
    input: str = ""
    # A system message: replaces the Alpaca preamble at the top of the prompt (null: the preamble).
    system: Optional[str] = None
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    seed: int = 0
    # auto: cuda if available, else cpu.
    device: Device = Device.auto
    # Check a bundle against its SHA256SUMS before loading it.
    verify_checksums: bool = True


@dataclass
class ServeConfig:
    """convobot-serve (conf/commands/serve.yaml)."""
    # A merged bundle (or a run dir / adapter, served unmerged).
    model: str = MISSING
    # Loopback only by default: 0.0.0.0 exposes the model to the network.
    host: str = "127.0.0.1"
    port: int = 8000
    # The id clients ask for and /v1/models lists (null: the bundle folder's name); other ids get 404.
    model_id: Optional[str] = None
    device: Device = Device.auto
    verify_checksums: bool = True
    log_level: str = "info"


@dataclass
class GGUFConfig:
    """convobot-export-gguf (conf/commands/gguf.yaml)."""
    model: str = MISSING
    # Any of f32, f16, q8_0; each is written, loaded back with llama.cpp and checked before it is kept.
    types: list[str] = field(default_factory=lambda: ["f32", "f16"])
    # null: <model>/gguf (the bundle's SHA256SUMS and merge_report.json are refreshed).
    output_dir: Optional[str] = None
    overwrite: bool = False
    # llama.cpp's convert_hf_to_gguf.py (with its conversion/ package and gguf-py/ beside it): null takes the copy
    # vendored in the llama-cpp-python sdist of the installed version (fetched by pip once, then cached).
    converter: Optional[str] = None
    # Held-out rows whose logits and greedy answers must match PyTorch's.
    check_rows: int = 4
    greedy_tokens: int = 16
    # Max |logit difference| against PyTorch, per type (weights in f16 or 8 bits change logits by design).
    tolerance: dict[str, float] = field(default_factory=lambda: {"f32": 2e-2, "f16": 0.1, "q8_0": 1.0})
    verify_checksums: bool = True


# ----------------------------------------------------------------------------- checking


def validate(cfg: DictConfig | dict, schema: type = TrainConfig):
    """Check a composed config against `schema` and return it as a typed object.

    Raises ConfigError naming the offending key.
    """
    raw = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    raw = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k != "hydra"])
    try:
        typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw))
    except MissingMandatoryValue as err:
        raise ConfigError(f"config key '{err.full_key}': {err.full_key}=... is required") from err
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        message = str(getattr(err, "msg", err)).splitlines()[0]  # OmegaConf appends full_key/object_type lines
        raise ConfigError(f"config key '{key}': {message}") from err
    if isinstance(typed, TrainConfig):
        _check(_training_checks(typed) + _data_checks(typed.data))
    elif isinstance(typed, EvalConfig):
        _check(_eval_checks(typed) + (_data_checks(typed.data) if typed.data is not None else []))
    elif isinstance(typed, ChatConfig):
        _check([("prompt", typed.prompt is None or bool(typed.prompt.strip()),
                 "is empty: give an instruction, or leave prompt out for an interactive session"),
                ("generation.max_new_tokens", typed.generation.max_new_tokens > 0, "must be > 0")])
    elif isinstance(typed, MergeConfig):
        _check([("verify_rows", typed.verify_rows > 0, "must be > 0"),
                ("perplexity_rows", typed.perplexity_rows > 0, "must be > 0"),
                ("batch_tokens", typed.batch_tokens > 0, "must be > 0")])
    return typed


def _check(checks: list[tuple[str, bool, str]]) -> None:
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {why}")


def _eval_checks(cfg: EvalConfig) -> list[tuple[str, bool, str]]:
    return [
        ("max_rows", cfg.max_rows is None or cfg.max_rows > 0, "must be > 0, or null for all rows"),
        ("max_length", cfg.max_length is None or cfg.max_length > 1, "must be > 1, or null"),
        ("batch_tokens", cfg.batch_tokens > 0, "must be > 0"),
        ("sliding.window", cfg.sliding.window is None or cfg.sliding.window > 1, "must be > 1, or null"),
        ("sliding.stride", cfg.sliding.stride is None or cfg.sliding.stride > 0,
         "must be > 0 (and below the window), or null for window // 2"),
    ]


def _data_checks(data: DataConfig) -> list[tuple[str, bool, str]]:
    return [
        ("data.max_rows", data.max_rows is None or data.max_rows > 0, "must be > 0, or null for all rows"),
        ("data.max_length", data.max_length > 8, "must be > 8"),
        ("data.eval_size", data.eval_size > 0, "must be > 0"),
        # The data group's `path: ???` does not survive the merge onto the schema's null: checked here.
        ("data.path", data.source == DataSource.bundled or bool(data.path),
         f"is required for data.source={data.source.value}: data.path=..."),
    ]


def _training_checks(cfg: TrainConfig) -> list[tuple[str, bool, str]]:
    return [
        ("peft.r", cfg.peft.r > 0, "must be > 0"),
        ("train.max_steps", cfg.train.max_steps > 0 or cfg.train.max_steps == -1,
         "must be > 0, or -1 to train for train.epochs"),
        ("train.epochs", cfg.train.max_steps > 0 or cfg.train.epochs > 0, "must be > 0 (or set train.max_steps)"),
        ("hardware.eval_tokens", cfg.hardware.eval_tokens > 0, "must be > 0"),
        ("peft.dropout", 0 <= cfg.peft.dropout < 1, "must be in [0, 1)"),
        ("model.dropout", cfg.model.dropout is None or 0 <= cfg.model.dropout < 1, "must be in [0, 1), or null"),
        ("peft.target_modules", bool(cfg.peft.target_modules), "must name at least one module"),
        ("optim.lr", cfg.optim.lr > 0, "must be > 0"),
        ("hardware.batch_size", cfg.hardware.batch_size > 0, "must be > 0"),
        ("hardware.grad_accum", cfg.hardware.grad_accum > 0, "must be > 0"),
        ("train.keep_last", cfg.train.keep_last is None or cfg.train.keep_last > 0, "must be > 0, or null to keep all"),
        ("train.eval_steps", not cfg.train.keep_best or bool(cfg.train.eval_steps),
         "is required by train.keep_best=true (evaluation picks the best checkpoint)"),
        ("train.save_steps", not (cfg.train.keep_best and cfg.train.eval_steps)
         or cfg.train.save_steps % cfg.train.eval_steps == 0,
         "must be a multiple of train.eval_steps when train.keep_best=true"),
        ("resume", isinstance(cfg.resume, bool) or (isinstance(cfg.resume, str) and bool(cfg.resume.strip())),
         "must be true, false, auto, or a run dir / checkpoint path"),
    ]


def to_container(cfg: TrainConfig) -> dict:
    """Plain dict (enums as strings), for saving and reports."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def compose(overrides: list[str] | None = None, config_name: str = "train", config_dir: Path = CONF_DIR) -> DictConfig:
    """Compose `conf/` (or `conf/commands/`) with Hydra's compose API (tests, notebooks, scripts)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


COMMAND_SCHEMAS = {"merge": MergeConfig, "eval": EvalConfig, "export": ExportConfig, "chat": ChatConfig,
                   "serve": ServeConfig, "gguf": GGUFConfig}


def compose_command(name: str, overrides: list[str] | None = None):
    """A release command's config from conf/commands/<name>.yaml, composed as its CLI does and validated."""
    return validate(compose(overrides, name, COMMANDS_CONF_DIR), COMMAND_SCHEMAS[name])
