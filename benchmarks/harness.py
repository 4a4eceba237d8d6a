"""The benchmark harness: GPT-2 small trained by the reference setup or convobot's, one configuration at a time in
one process, with trained tokens/s timed over windows of steps and the peak memory each configuration adds.

    from harness import Settings, measure, prepare
    settings = Settings(device="cpu", rows=ROWS_FILE, smoke=False, max_length=512, batch_size=2,
                        warmup=2, steps=6, repeats=5)
    setup = prepare(settings, workdir)
    reference, lora = measure(setup, settings, ["reference", "lora"], interleave=True)

benchmarks/train_throughput.py (the configurations side by side) and benchmarks/scaling.py (one configuration
over sequence lengths and batch sizes, each point its own Settings) are its two scripts.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

REPO = Path(__file__).resolve().parent.parent
# ../shared/data beside the repo; benchmarks/gpu_check.sh points this at a copy it brings along.
SHARED_DATA = Path(os.environ.get("CONVOBOT_SHARED_DATA", REPO.parent / "shared" / "data"))
ROWS_FILE = SHARED_DATA / "alpaca_gpt4" / "train_sample.jsonl"
TOKENIZER_DIR = SHARED_DATA / "gpt2-tokenizer"
RESULTS_DIR = REPO / "benchmarks" / "results"
MiB = 2**20

# GPT2Config() defaults, built through convobot's random-init model source (model=tiny_random).
GPT2_SMALL = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.n_positions=1024",
              "model.initializer_range=0.02"]
# For smoke tests of this script: same code path, a model small enough to step in milliseconds.
SMOKE_MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.n_positions=1024"]
# The reference run: 3 epochs of alpaca-gpt4 took 4h25m at about 2,075 trained tokens/s, i.e. ~33M tokens.
ALPACA_3_EPOCH_TOKENS = 33_000_000
REFERENCE = "reference"
# convobot's fast path for GPT-2-scale rows. Packing is off in conf/train.yaml because the embedded tiny default
# (128-token rows, a 0.5M-parameter model) trains faster unpacked; see tests/test_packing.py for its correctness.
FAST_PATH = ["train.packing=true"]
# convobot configurations: overrides on top of the composed defaults plus FAST_PATH.
CONVOBOT_CONFIGS = {
    "lora": ["peft=lora"],
    "full": ["peft=full"],
    # Variants: what each part is worth, and what the levers outside this path would give.
    "lora_unpacked": ["peft=lora", "train.packing=false"],
    "full_unpacked": ["peft=full", "train.packing=false"],
    "lora_grouped": ["peft=lora", "train.packing=false", "train.group_by_length=true"],
    "full_grouped": ["peft=full", "train.packing=false", "train.group_by_length=true"],
    "lora_compile": ["peft=lora", "hardware.torch_compile=true"],
    "full_compile": ["peft=full", "hardware.torch_compile=true"],
    "lora_chunked_head": ["peft=lora", "hardware.loss_head=chunked"],
    "full_chunked_head": ["peft=full", "hardware.loss_head=chunked"],
    "lora_dropout": ["peft=lora", "model.dropout=0.1", "peft.dropout=0.05"],
    "full_dropout": ["peft=full", "model.dropout=0.1"],
    "lora_whole_text_loss": ["peft=lora", "data.completion_only=false"],
    "full_whole_text_loss": ["peft=full", "data.completion_only=false"],
    "full_8bit": ["peft=full", "optim=adamw_8bit"],
}
DEFAULT_CONFIGS = f"{REFERENCE},lora,full"
HARDWARE = {"cpu": "cpu", "cuda": "rtx3050_4gb"}


@dataclass(frozen=True)
class Settings:
    """What a measured point trains, shared by the configurations measured side by side at it."""

    device: str  # "cpu" or "cuda"
    rows: Path
    smoke: bool  # a 2-layer model instead of GPT-2 small (tests of the benchmarks)
    max_length: int  # data.max_length: packed, each sequence holds close to this many tokens
    batch_size: int  # rows (or packed sequences) per optimizer step
    warmup: int  # steps excluded while the first turn builds and warms up
    steps: int  # steps per timed window
    repeats: int  # timed windows

    @property
    def total_steps(self) -> int:
        """Warm-up, then per window one re-warm step and the timed ones."""
        return self.warmup + self.repeats * (1 + self.steps)


# --- memory: what one configuration adds to the process, while the others are paused

def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # "5" resets the process's resident-set high-water mark (VmHWM), Linux >= 4.0
        Path("/proc/self/clear_refs").write_text("5")


def _now_and_peak(device: str) -> tuple[int, int]:
    if device == "cuda":
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    return _proc_status_kib("VmRSS") * 1024, _proc_status_kib("VmHWM") * 1024


def release_freed_memory(device: str) -> None:
    """Give what a configuration freed back to the system, so that the next one's growth is its own: glibc keeps
    freed heap pages resident (and hands them to the next allocation) unless trimmed."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class MemoryMeter:
    """Peak memory of one configuration. It only allocates during its own turns and the others are paused
    then, so whatever the process grows by between start() and stop() is its own."""

    def __init__(self, device: str):
        self.device, self.resident, self.peak, self.base = device, 0, 0, 0
        try:
            _reset_peak(device)
            self.supported = True
        except OSError:  # not Linux: no per-configuration peak, reported as None
            self.supported = False

    def start(self) -> None:
        if self.supported:
            _reset_peak(self.device)
            self.base = _now_and_peak(self.device)[0]

    def stop(self) -> None:
        if self.supported:
            peak = _now_and_peak(self.device)[1]
            release_freed_memory(self.device)  # what it freed must not count as resident, nor be reused unseen
            now = _now_and_peak(self.device)[0]
            self.peak = max(self.peak, self.resident + peak - self.base)
            self.resident += now - self.base


# --- turns: one configuration trains at a time

class Turns:
    """Lets one configuration's thread run at a time. Interleaved, a thread hands over after each timed window;
    otherwise only when it has finished."""

    def __init__(self, names: list[str], interleave: bool):
        self.names, self.interleave, self.done = names, interleave, set()
        self.current = names[0]
        self.cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.current == name)

    def hand_over(self, name: str, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.done.add(name)
            if finished or self.interleave:
                start = self.names.index(name) + 1
                ring = self.names[start:] + self.names[:start]
                self.current = next((n for n in ring if n not in self.done), None)
            self.cond.notify_all()


@dataclass
class Measurement:
    name: str
    description: str
    windows: list[dict] = field(default_factory=list)  # {tokens, seconds, steps, tokens_per_second}
    peak_memory_bytes: int | None = None
    trainable_params: int = 0
    total_params: int = 0
    load: list[float] = field(default_factory=list)  # 1-min load average at each turn start

    @property
    def tokens_per_second(self) -> float:
        return statistics.median(w["tokens_per_second"] for w in self.windows)


class Runner:
    """Trains one configuration in its own thread, timing windows of steps between hand-overs."""

    def __init__(self, name: str, build, turns: Turns, settings: Settings):
        self.name, self.build, self.turns, self.settings = name, build, turns, settings
        self.device = settings.device
        self.memory = MemoryMeter(self.device)
        self.result = Measurement(name, "")
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"bench-{name}", daemon=True)

    def _sync(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()  # the step's kernels are queued, not finished
        return time.perf_counter()

    def _begin_turn(self) -> None:
        self.turns.wait(self.name)
        self.result.load.append(os.getloadavg()[0])
        self.memory.start()
        self._clock = None  # (start time, tokens, step) once the turn's re-warm step is done

    def _end_turn(self, last: bool = False) -> None:
        self.memory.stop()
        if not last:
            self.turns.hand_over(self.name)
            self._begin_turn()

    def on_step_end(self, step: int, tokens: int) -> None:
        """Called from the Trainer after every step. The first turn builds the model and takes the warm-up steps;
        every later turn takes one untimed re-warm step (it faults back in what the hand-over freed), then a
        timed window of --steps steps."""
        settings = self.settings
        if step == settings.warmup:
            self._end_turn()
        elif step > settings.warmup and self._clock is None:
            self._clock = (self._sync(), tokens, step)
        elif self._clock is not None and step - self._clock[2] == settings.steps:
            seconds = self._sync() - self._clock[0]
            done = tokens - self._clock[1]
            self.result.windows.append({"tokens": done, "seconds": seconds, "steps": settings.steps,
                                        "tokens_per_second": done / seconds})
            self._end_turn(last=len(self.result.windows) == settings.repeats)

    def _run(self) -> None:
        trainer = None
        try:
            self._begin_turn()
            trainer, self.result.description = self.build()
            trainer.remove_callback(PrinterCallback)  # its per-run log dict would interleave with the report
            trainer.add_callback(StepClock(self))
            self.result.trainable_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            self.result.total_params = sum(p.numel() for p in trainer.model.parameters())
            trainer.train()
            self.result.peak_memory_bytes = self.memory.peak if self.memory.supported else None
        except BaseException as err:  # re-raised by the main thread
            self.error = err
        finally:
            del trainer
            release_freed_memory(self.device)
            self.turns.hand_over(self.name, finished=True)


class StepClock(TrainerCallback):
    """Hands each finished step to the runner, which times the windows and ends the turns."""

    def __init__(self, runner: Runner):
        self.runner = runner

    def on_step_end(self, args, state, control, **kwargs):
        self.runner.on_step_end(state.global_step, state.num_input_tokens_seen)


# --- the configurations

@dataclass
class Setup:
    device: torch.device
    tokenizer: object
    dataset: object  # convobot.data.examples.InstructionData: every configuration trains on its train rows
    workdir: Path


def compose_config(setup: Setup, settings: Settings, overrides: list[str]):
    from convobot.config import compose, validate

    return validate(compose([
        "model=tiny_random", f"model.tokenizer={setup.workdir / 'tokenizer'}",
        *(SMOKE_MODEL if settings.smoke else GPT2_SMALL),
        "data=local", f"data.path={settings.rows}", f"data.max_length={settings.max_length}", "data.eval_size=8",
        f"hardware={HARDWARE[setup.device.type]}", f"hardware.batch_size={settings.batch_size}",
        f"train.max_steps={settings.total_steps}", "train.save_steps=1000000",
        "train.logging_steps=1000000", "report.before=false", *overrides,
    ]))


def build_reference(setup: Setup, settings: Settings):
    """transformers' Trainer on plainly tokenized rows, padded to the longest row of each batch, with its
    defaults: GPT-2's dropout, the loss on the whole text, AdamW (fused), SDPA."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from convobot.model.base import load_base_model

    cfg = compose_config(setup, settings, ["peft=full", "model.dropout=null"])
    tokenizer = setup.tokenizer
    texts = [p + c for p, c in zip(setup.dataset.train["prompt"], setup.dataset.train["completion"])]
    rows = Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=settings.max_length),
        batched=True, remove_columns=["text"])
    fp16 = setup.device.type == "cuda"
    training_args = TrainingArguments(
        output_dir=str(setup.workdir / REFERENCE), per_device_train_batch_size=settings.batch_size,
        max_steps=cfg.train.max_steps, learning_rate=5e-5, fp16=fp16, use_cpu=setup.device.type == "cpu",
        include_num_input_tokens_seen="non_padding",
        save_strategy="no", logging_steps=cfg.train.logging_steps, report_to="none", disable_tqdm=True,
        dataloader_pin_memory=fp16, seed=cfg.seed)
    model = load_base_model(cfg.model, tokenizer)
    trainer = Trainer(model=model, args=training_args, train_dataset=rows,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    return trainer, (f"HF Trainer, full fine-tune, batch {settings.batch_size} padded rows, GPT-2 dropout "
                     f"{model.config.attn_pdrop}, whole-text loss, {training_args.optim.value}, "
                     f"{'fp16' if fp16 else 'fp32'}")


def build_convobot(setup: Setup, settings: Settings, name: str):
    """convobot.training.recipe.build_trainer (model, dropout, LoRA, optimizer, SFTTrainer, loss head) for the config."""
    from convobot.config import PeftMethod
    from convobot.training.recipe import build_trainer, resolve_precision

    cfg = compose_config(setup, settings, FAST_PATH + CONVOBOT_CONFIGS[name])
    precision = resolve_precision(cfg, setup.device)
    trainer, optimizer = build_trainer(cfg, setup.workdir / name, setup.device, precision, setup.tokenizer,
                                       setup.dataset)
    trainer.args.disable_tqdm = True
    loop, hw = cfg.train, cfg.hardware
    shape = (f"{hw.batch_size} x 1 packed sequence of <= {cfg.data.max_length} tokens" if loop.packing
             else f"batch {hw.batch_size} padded rows" + (" grouped by length" if loop.group_by_length else ""))
    method = f"lora r={cfg.peft.r} lora_dropout={cfg.peft.dropout}" if cfg.peft.method == PeftMethod.lora else "full"
    loss = "response-only loss" if cfg.data.completion_only else "whole-text loss"
    return trainer, (f"convobot {method}, {shape}, model dropout {cfg.model.dropout}, {loss} ({hw.loss_head.value} "
                     f"head), {optimizer.name}, {precision.value}, checkpointing={hw.gradient_checkpointing}, "
                     f"compile={hw.torch_compile}")


def prepare(settings: Settings, workdir: Path) -> Setup:
    """The rows and the real GPT-2 tokenizer, through convobot.data.examples (the same split for every configuration)."""
    from transformers import GPT2TokenizerFast

    from convobot.data.examples import prepare
    from convobot.model.tokenizer import load_tokenizer

    # The shared folder holds only vocab.json + merges.txt; saving gives the tokenizer.json that
    # convobot.model.tokenizer.load_tokenizer (AutoTokenizer) reads.
    GPT2TokenizerFast.from_pretrained(str(TOKENIZER_DIR)).save_pretrained(str(workdir / "tokenizer"))
    setup = Setup(torch.device(settings.device), None, None, workdir)
    cfg = compose_config(setup, settings, [])
    setup.tokenizer = load_tokenizer(cfg.model.tokenizer)
    setup.dataset = prepare(cfg.data, setup.tokenizer)
    return setup


def builder(name: str, setup: Setup, settings: Settings):
    if name == REFERENCE:
        return lambda: build_reference(setup, settings)
    return lambda: build_convobot(setup, settings, name)


def measure(setup: Setup, settings: Settings, names: list[str], interleave: bool) -> list[Measurement]:
    """Train each named configuration at `settings`, taking turns (interleaved: window by window)."""
    turns = Turns(names, interleave)
    runners = [Runner(name, builder(name, setup, settings), turns, settings) for name in names]
    for runner in runners:
        runner.thread.start()
    for runner in runners:
        runner.thread.join()
    for runner in runners:
        if runner.error is not None:
            raise RuntimeError(f"configuration '{runner.name}' failed: {runner.error!r}") from runner.error
    return [runner.result for runner in runners]


# --- the process and the report

def prepare_process(device: str, threads: int | None) -> None:
    """Threads, glibc's thresholds as convobot's cpu profile sets them, and no progress bars or per-step info
    logs interleaving with the report."""
    import datasets
    from transformers.utils import logging as hf_logging

    from convobot.model import cpu_memory

    if device == "cpu":
        cpu_memory.keep_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()


def missing_inputs(device: str, rows: Path) -> str | None:
    """Why the benchmark cannot run here (no GPU for the GPU variant, no ../shared inputs), or None."""
    if device == "cuda" and not torch.cuda.is_available():
        return "skipped: --device cuda but no CUDA device is visible (this is the GPU variant; no result written)"
    absent = [str(p) for p in (rows, TOKENIZER_DIR) if not p.exists()]
    if absent:
        return f"skipped: {', '.join(absent)} absent (real alpaca-gpt4 rows and the GPT-2 tokenizer live there)"
    return None


# The vector extensions that decide fp32 matmul speed on a CPU (oneDNN and MKL pick kernels by them).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def vector_isa() -> list[str]:
    """Which of ISA_FLAGS this CPU reports (Linux /proc/cpuinfo; [] elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), []) if cpuinfo.exists() else []
    return [flag for flag in ISA_FLAGS if flag in flags]


def machine(device: str) -> dict:
    from convobot.scoring.measure import versions

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    info = {"cpu": cpu, "isa": vector_isa(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "versions": versions()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1)}
    return info


def save_report(stem: Path, text: str, summary: dict) -> None:
    from convobot import atomic

    atomic.write_text(stem.with_suffix(".md"), text)
    atomic.write_json(stem.with_suffix(".json"), summary)
    print(f"wrote {stem.with_suffix('.md')} and .json")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options this benchmark and benchmarks/scaling.py share."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rows", type=Path, default=ROWS_FILE)
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model instead of GPT-2 small (tests)")
    parser.add_argument("--note", default="", help="free text for the results file (e.g. other load)")
    parser.add_argument("--out", type=Path, default=None, help="results stem (default: benchmarks/results/...)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, one per core). On a CPU other jobs share, 1 "
                             "avoids each op waiting for a descheduled second thread, which swamps short sequences")
