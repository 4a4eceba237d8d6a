"""The release commands' configs: the schemas of `conf/commands/*.yaml` (merge, eval, export-onnx, export-gguf,
chat, serve), each checking its own values (`checks`) beyond what OmegaConf's types say."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from omegaconf import MISSING

from convobot.config.training import Check, DataConfig, Device, LoggerConfig


@dataclass
class GenerationOptions:
    """Sampling settings for chat and for a release bundle's generation_config.json (temperature 0 = greedy)."""
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.1


@dataclass
class MergeConfig:
    """convobot merge (conf/commands/merge.yaml)."""
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

    def checks(self) -> list[Check]:
        return [("verify_rows", self.verify_rows > 0, "must be > 0"),
                ("perplexity_rows", self.perplexity_rows > 0, "must be > 0"),
                ("batch_tokens", self.batch_tokens > 0, "must be > 0")]


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
class HarnessConfig:
    # lm-evaluation-harness tasks run on the bundle (`convobot_tasks`: convobot's offline task); []: none.
    tasks: list[str] = field(default_factory=list)
    # Documents per task (null: all).
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 8


@dataclass
class EvalConfig:
    """convobot eval (conf/commands/eval.yaml)."""
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
    # Also answer the rows (greedy) and score the answers against the references: BLEU, chrF, ROUGE, exact match.
    generate: bool = False
    max_new_tokens: int = 64
    generate_batch_size: int = 16
    # A folder for each model's answers, <model>.jsonl (prompt, reference, answer, the row's scores); null: beside
    # `output`, when it is set.
    predictions_dir: Optional[str] = None
    # lm-evaluation-harness on a merged bundle (model=BUNDLE): harness.tasks=[convobot_tasks,...].
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    # The evaluation as a tracker run of its own (logger=mlflow|tensorboard|wandb, conf/logger/).
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def checks(self) -> list[Check]:
        return (self.data.checks() if self.data is not None else []) + [
            ("max_new_tokens", self.max_new_tokens > 0, "must be > 0"),
            ("generate_batch_size", self.generate_batch_size > 0, "must be > 0"),
            ("harness.limit", self.harness.limit is None or self.harness.limit > 0, "must be > 0, or null for all"),
            ("harness.batch_size", self.harness.batch_size > 0, "must be > 0"),
            ("max_rows", self.max_rows is None or self.max_rows > 0, "must be > 0, or null for all rows"),
            ("max_length", self.max_length is None or self.max_length > 1, "must be > 1, or null"),
            ("batch_tokens", self.batch_tokens > 0, "must be > 0"),
            ("sliding.window", self.sliding.window is None or self.sliding.window > 1, "must be > 1, or null"),
            ("sliding.stride", self.sliding.stride is None or self.sliding.stride > 0,
             "must be > 0 (and below the window), or null for window // 2"),
        ]


@dataclass
class ExportConfig:
    """convobot export-onnx (conf/commands/export.yaml)."""
    # A merged bundle (config.json + model.safetensors), e.g. from convobot merge.
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
    """convobot chat (conf/commands/chat.yaml)."""
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

    def checks(self) -> list[Check]:
        return [("prompt", self.prompt is None or bool(self.prompt.strip()),
                 "is empty: give an instruction, or leave prompt out for an interactive session"),
                ("generation.max_new_tokens", self.generation.max_new_tokens > 0, "must be > 0")]


@dataclass
class ServeConfig:
    """convobot serve (conf/commands/serve.yaml)."""
    # A bundle, run dir or adapter folder to serve (`id=path` names it); `models` takes several.
    model: Optional[str] = None
    models: list[str] = field(default_factory=list)
    # Loopback only by default: 0.0.0.0 exposes the models to the network (set api_key then).
    host: str = "127.0.0.1"
    port: int = 8000
    # With one model: the id clients ask for and /v1/models lists (null: its folder's name).
    model_id: Optional[str] = None
    # auto (llama.cpp for merged bundles on the CPU when llama-cpp-python is installed, else PyTorch), torch,
    # llama_cpp.
    backend: str = "auto"
    # The bundle's GGUF the llama.cpp backend serves (exported and checked by convobot export-gguf if absent).
    gguf_type: str = "f16"
    # Sequences that decode together per base model (continuous batching); more wait in a queue.
    max_batch: int = 8
    # Requests that may wait for a free row; past it a 429 with Retry-After.
    max_queued: int = 64
    # Choices per request (`n`).
    max_n: int = 8
    # Prompt tokens prefilled per engine step: a long prompt stalls the running sequences one chunk at a time.
    prefill_chunk: int = 256
    # Request bodies larger than this get a 413 before they are read.
    max_body_bytes: int = 1048576
    # Required as `Authorization: Bearer <key>` on every /v1 route (null: CONVOBOT_API_KEY, else no key).
    api_key: Optional[str] = None
    # llama.cpp threads (null: every core).
    threads: Optional[int] = None
    device: Device = Device.auto
    verify_checksums: bool = True
    log_level: str = "info"
    # A web page at /ui beside the API: chat, an arena of the served models side by side, and run reports.
    ui: bool = False
    # Report folders the page's Runs tab shows (convobot compare --out folders, sweep dirs).
    reports: list[str] = field(default_factory=list)

    def checks(self) -> list[Check]:
        return [("backend", self.backend in ("auto", "torch", "llama_cpp"), "must be auto, torch or llama_cpp"),
                ("gguf_type", self.gguf_type in ("f32", "f16", "q8_0"), "must be f32, f16 or q8_0"),
                ("max_batch", self.max_batch > 0, "must be > 0"),
                ("max_queued", self.max_queued >= 0, "must be >= 0"),
                ("max_n", self.max_n > 0, "must be > 0"),
                ("prefill_chunk", self.prefill_chunk > 0, "must be > 0"),
                ("max_body_bytes", self.max_body_bytes > 0, "must be > 0"),
                ("port", 0 <= self.port < 65536, "must be a TCP port")]


@dataclass
class GGUFConfig:
    """convobot export-gguf (conf/commands/gguf.yaml)."""
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


# conf/commands/<name>.yaml -> its schema.
COMMAND_SCHEMAS = {"merge": MergeConfig, "eval": EvalConfig, "export": ExportConfig, "chat": ChatConfig,
                   "serve": ServeConfig, "gguf": GGUFConfig}
