"""Trained tokens per second of GPT-2 small: the reference setup against convobot's fast path, side by side.

Examples:
    python benchmarks/train_throughput.py                        # CPU, ~5 min on 2 cores (make bench)
    python benchmarks/train_throughput.py --steps 2 --repeats 2  # quicker, noisier
    python benchmarks/train_throughput.py --device cuda          # GPU variant: fp16, 8-bit AdamW, rtx3050_4gb
    python benchmarks/train_throughput.py --configs reference,lora,lora_chunked_head,lora_dropout --no-save

Everything runs in ONE process on the same rows (../shared/data/alpaca_gpt4 through convobot.data, the real
GPT-2 tokenizer from ../shared/data/gpt2-tokenizer) and the real GPT-2 small architecture (GPT2Config() sizes,
124M parameters, random init, so nothing is downloaded):
  reference   the reference run: transformers' Trainer with its defaults, full fine-tune, batch 2, rows tokenized
              by a plain tokenizer and padded by DataCollatorForLanguageModeling, GPT-2's dropout, the loss on
              the whole text, AdamW (fused) (fp16 mixed precision on CUDA)
  lora, full  convobot.train.build_trainer with the default config for the hardware profile (cpu, or
              rtx3050_4gb on CUDA) plus packed rows (train.packing=true): no dropout, SDPA, response-only loss,
              the cpu profile's plain loss head on labelled tokens (rtx3050_4gb: TRL's chunked head),
              optim=auto (CPU: fused AdamW; CUDA: 8-bit AdamW), row-by-row attention over the packed rows;
              batch 2 packed sequences per optimizer step
The cpu profile's glibc setting (hardware.tune_malloc, convobot/cpu_memory.py) is process-wide, so on CPU it is set
once for the whole process, and run as a script the benchmark restarts itself with one malloc arena (threads would
otherwise get arenas that mmap large blocks): the reference gets the same allocator, and the ratios do not count it.
  others      variants (--configs) that isolate one change each; see CONVOBOT_CONFIGS
Trained tokens are the Trainer's num_input_tokens_seen: non-padding tokens, never padded width (EOS counted on
both paths; tests/test_packing.py checks the count). Per configuration, --warmup steps are excluded, then
--repeats windows of --steps steps are timed, each after one untimed step (the memory meter hands freed memory
back between turns, and that step faults it in again). On CPU the configurations take turns window by window (each
trains in its own thread, one at a time), so load from other processes falls on all of them alike; on CUDA
they run one after another, each freed before the next, so a 4 GB card holds one at a time.
Peak memory is what each configuration adds to the process over its own turns: CUDA max_memory_allocated
(VRAM), or on CPU the growth of the resident set's high-water mark (Linux /proc/self/clear_refs).
The projection is for 3 epochs of alpaca-gpt4, about 33M trained tokens (52,002 rows x ~207 tokens x 3,
which is also what the reference's 4h25m at ~2,075 tokens/s amounts to).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("CONVOBOT_SHARED_DATA", REPO.parent / "shared" / "data"))  # gpu_check.sh: carried
ROWS_FILE = SHARED_DATA / "alpaca_gpt4" / "train_sample.jsonl"
TOKENIZER_DIR = SHARED_DATA / "gpt2-tokenizer"
RESULTS_DIR = REPO / "benchmarks" / "results"
MiB = 2**20

# GPT2Config() defaults, built through convobot's random-init ("tiny") model source.
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

    def __init__(self, name: str, build, turns: Turns, device: str, args):
        self.name, self.build, self.turns, self.device, self.args = name, build, turns, device, args
        self.memory = MemoryMeter(device)
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
        args = self.args
        if step == args.warmup:
            self._end_turn()
        elif step > args.warmup and self._clock is None:
            self._clock = (self._sync(), tokens, step)
        elif self._clock is not None and step - self._clock[2] == args.steps:
            seconds = self._sync() - self._clock[0]
            done = tokens - self._clock[1]
            self.result.windows.append({"tokens": done, "seconds": seconds, "steps": args.steps,
                                        "tokens_per_second": done / seconds})
            self._end_turn(last=len(self.result.windows) == args.repeats)

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
    dataset: object  # convobot.data.InstructionData: both setups train on its train rows
    workdir: Path
    args: argparse.Namespace


def compose_config(setup: Setup, overrides: list[str]):
    from convobot.config import compose, validate

    args = setup.args
    return validate(compose([
        "model=tiny", f"model.tokenizer={setup.workdir / 'tokenizer'}", *(SMOKE_MODEL if args.smoke else GPT2_SMALL),
        "data=local", f"data.path={args.rows}", f"data.max_length={args.max_length}", "data.eval_size=8",
        f"hardware={HARDWARE[setup.device.type]}", f"hardware.batch_size={args.batch_size}",
        f"train.max_steps={total_steps(args)}", "train.save_steps=1000000",
        "train.logging_steps=1000000", "report.before=false", *overrides,
    ]))


def build_reference(setup: Setup):
    """transformers' Trainer on plainly tokenized rows, padded to the longest row of each batch, with its
    defaults: GPT-2's dropout, the loss on the whole text, AdamW (fused), SDPA."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from convobot import modeling

    cfg = compose_config(setup, ["peft=full", "model.dropout=null"])
    tokenizer, args = setup.tokenizer, setup.args
    texts = [p + c for p, c in zip(setup.dataset.train["prompt"], setup.dataset.train["completion"])]
    rows = Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=args.max_length),
        batched=True, remove_columns=["text"])
    fp16 = setup.device.type == "cuda"
    training_args = TrainingArguments(
        output_dir=str(setup.workdir / REFERENCE), per_device_train_batch_size=args.batch_size,
        max_steps=cfg.train.max_steps, learning_rate=5e-5, fp16=fp16, use_cpu=setup.device.type == "cpu",
        include_num_input_tokens_seen="non_padding",
        save_strategy="no", logging_steps=cfg.train.logging_steps, report_to="none", disable_tqdm=True,
        dataloader_pin_memory=fp16, seed=cfg.seed)
    model = modeling.load_base_model(cfg.model, tokenizer)
    trainer = Trainer(model=model, args=training_args, train_dataset=rows,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    return trainer, (f"HF Trainer, full fine-tune, batch {args.batch_size} padded rows, GPT-2 dropout "
                     f"{model.config.attn_pdrop}, whole-text loss, {training_args.optim.value}, "
                     f"{'fp16' if fp16 else 'fp32'}")


def build_convobot(setup: Setup, name: str):
    """convobot.train.build_trainer (model, dropout, LoRA, optimizer, SFTTrainer, loss head) for the config."""
    from convobot.train import build_trainer, resolve_precision

    cfg = compose_config(setup, FAST_PATH + CONVOBOT_CONFIGS[name])
    precision = resolve_precision(cfg, setup.device)
    trainer, optimizer = build_trainer(cfg, setup.workdir / name, setup.device, precision, setup.tokenizer,
                                       setup.dataset)
    trainer.args.disable_tqdm = True
    loop, hw = cfg.train, cfg.hardware
    shape = (f"{hw.batch_size} x 1 packed sequence of <= {cfg.data.max_length} tokens" if loop.packing
             else f"batch {hw.batch_size} padded rows" + (" grouped by length" if loop.group_by_length else ""))
    method = f"lora r={cfg.peft.r} lora_dropout={cfg.peft.dropout}" if cfg.peft.method.value == "lora" else "full"
    loss = "response-only loss" if cfg.data.completion_only else "whole-text loss"
    return trainer, (f"convobot {method}, {shape}, model dropout {cfg.model.dropout}, {loss} ({hw.loss_head.value} "
                     f"head), {optimizer.name}, {precision.value}, checkpointing={hw.gradient_checkpointing}, "
                     f"compile={hw.torch_compile}")


def prepare(args, workdir: Path) -> Setup:
    """The rows and the real GPT-2 tokenizer, through convobot.data (the same split for every configuration)."""
    from transformers import GPT2TokenizerFast

    from convobot import data, modeling

    # The shared folder holds only vocab.json + merges.txt; saving gives the tokenizer.json that
    # convobot.modeling.load_tokenizer (AutoTokenizer) reads.
    GPT2TokenizerFast.from_pretrained(str(TOKENIZER_DIR)).save_pretrained(str(workdir / "tokenizer"))
    device = torch.device(args.device)
    setup = Setup(device, None, None, workdir, args)
    cfg = compose_config(setup, [])
    setup.tokenizer = modeling.load_tokenizer(cfg.model.tokenizer)
    setup.dataset = data.prepare(cfg.data, setup.tokenizer)
    return setup


def builder(name: str, setup: Setup):
    if name == REFERENCE:
        return lambda: build_reference(setup)
    return lambda: build_convobot(setup, name)


def measure(setup: Setup, names: list[str], interleave: bool) -> list[Measurement]:
    turns = Turns(names, interleave)
    runners = [Runner(name, builder(name, setup), turns, setup.device.type, setup.args) for name in names]
    for runner in runners:
        runner.thread.start()
    for runner in runners:
        runner.thread.join()
    for runner in runners:
        if runner.error is not None:
            raise RuntimeError(f"configuration '{runner.name}' failed: {runner.error!r}") from runner.error
    return [runner.result for runner in runners]


# --- report

def machine(device: str) -> dict:
    from convobot.metrics import versions

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "versions": versions()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1)}
    return info


def summarise(results: list[Measurement], setup: Setup, info: dict, started: datetime) -> dict:
    args = setup.args
    by_name = {m.name: m for m in results}
    reference = by_name.get(REFERENCE)
    rows = []
    for m in results:
        rates = [w["tokens_per_second"] for w in m.windows]
        tokens_per_step = sum(w["tokens"] for w in m.windows) / sum(w["steps"] for w in m.windows)
        row = {"name": m.name, "description": m.description, "tokens_per_second": m.tokens_per_second,
               "tokens_per_second_windows": rates, "tokens_per_step": tokens_per_step,
               "seconds_per_step": tokens_per_step / m.tokens_per_second,
               "peak_memory_mib": None if m.peak_memory_bytes is None else m.peak_memory_bytes / MiB,
               "trainable_params": m.trainable_params, "total_params": m.total_params,
               "projected_hours_3_epochs": ALPACA_3_EPOCH_TOKENS / m.tokens_per_second / 3600}
        if reference is not None and m is not reference:
            row["ratio_to_reference"] = m.tokens_per_second / reference.tokens_per_second
            if args.interleave:  # windows of one round ran back to back: their ratios see the same load
                row["ratio_per_round"] = [w["tokens_per_second"] / r["tokens_per_second"]
                                          for w, r in zip(m.windows, reference.windows)]
        rows.append(row)
    loads = [load for m in results for load in m.load]
    return {"benchmark": "train_throughput", "date": started.isoformat(timespec="seconds"),
            "wall_seconds": (datetime.now() - started).total_seconds(), "device": args.device, "machine": info,
            "settings": {"max_length": args.max_length, "batch_size": args.batch_size, "warmup_steps": args.warmup,
                         "steps_per_window": args.steps, "windows": args.repeats, "interleaved": args.interleave,
                         "rows": str(args.rows), "train_rows": len(setup.dataset.train), "smoke_model": args.smoke},
            "load_average_1min": {"min": min(loads), "max": max(loads),
                                  "note": f"includes this benchmark's own {torch.get_num_threads()} threads"},
            "note": args.note, "configs": rows}


def render(summary: dict) -> str:
    info, settings = summary["machine"], summary["settings"]
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads)"
    lines = [f"# Training throughput: GPT-2 small, reference vs convobot ({summary['device']})", "",
             f"- date: {summary['date']}; machine: {where}, {info['memory_gib']} GiB RAM"
             + (f", GPU memory {info['gpu_memory_gib']} GiB" if "gpu" in info else ""),
             f"- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
             f"- rows: {settings['rows']} (max_length {settings['max_length']}), batch {settings['batch_size']}; "
             f"{settings['warmup_steps']} warm-up steps excluded, then {settings['windows']} windows of "
             f"{settings['steps_per_window']} steps, each after an untimed re-warm step"
             + (", interleaved" if settings["interleaved"] else ""),
             f"- load average (1 min) at turn starts: {summary['load_average_1min']['min']:.2f}"
             f"-{summary['load_average_1min']['max']:.2f} ({summary['load_average_1min']['note']})",
             f"- wall time: {summary['wall_seconds']:.0f} s"]
    if summary["note"]:
        lines.append(f"- note: {summary['note']}")
    memory_kind = "peak VRAM" if summary["device"] == "cuda" else "peak RSS growth"
    lines += ["", "| config | trained tokens/s (median) | per window | vs reference | tokens/step | s/step "
              f"| {memory_kind} | 3 epochs (33M tokens) |", "|---|---|---|---|---|---|---|---|"]
    for row in summary["configs"]:
        ratio = row.get("ratio_to_reference")
        rounds = row.get("ratio_per_round")
        ratio_text = "-" if ratio is None else f"**{ratio:.2f}x**" + (
            f" (rounds {min(rounds):.2f}-{max(rounds):.2f})" if rounds else "")
        memory = "n/a" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:,.0f} MiB"
        lines.append(f"| {row['name']} | {row['tokens_per_second']:,.1f} | "
                     + ", ".join(f"{r:,.0f}" for r in row["tokens_per_second_windows"])
                     + f" | {ratio_text} | {row['tokens_per_step']:,.0f} | {row['seconds_per_step']:.2f} | {memory} | "
                     f"{row['projected_hours_3_epochs']:,.1f} h |")
    lines += [""] + [f"- {row['name']}: {row['description']}; trainable {row['trainable_params']:,} of "
                     f"{row['total_params']:,} params" for row in summary["configs"]]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help=f"comma-separated, from {[REFERENCE, *CONVOBOT_CONFIGS]}")
    parser.add_argument("--max-length", type=int, default=None,
                        help="data.max_length (default: cpu 512, the alpaca_gpt4 data config's; cuda 1024, the "
                             "reference run's)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=None, help="steps excluded (default: cpu 2, cuda 5)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed window (default: cpu 6, cuda 20)")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per configuration (the reference's "
                        "speed depends on its rows' lengths: 60 rows by default on CPU)")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                        help="take turns window by window (default: on for cpu; off for cuda, where every "
                             "configuration is freed before the next one so a 4 GB card holds one at a time)")
    parser.add_argument("--no-save", dest="save", action="store_false")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.max_length = (1024 if cuda else 512) if args.max_length is None else args.max_length
    args.warmup = (5 if cuda else 2) if args.warmup is None else args.warmup
    args.steps = (20 if cuda else 6) if args.steps is None else args.steps
    args.interleave = (not cuda) if args.interleave is None else args.interleave
    check_counts(parser, args)
    unknown = [n for n in args.configs.split(",") if n != REFERENCE and n not in CONVOBOT_CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {[REFERENCE, *CONVOBOT_CONFIGS]}")
    return args


def missing_inputs(args) -> str | None:
    if args.device == "cuda" and not torch.cuda.is_available():
        return "skipped: --device cuda but no CUDA device is visible (this is the GPU variant; no result written)"
    absent = [str(p) for p in (args.rows, TOKENIZER_DIR) if not p.exists()]
    if absent:
        return f"skipped: {', '.join(absent)} absent (real alpaca-gpt4 rows and the GPT-2 tokenizer live there)"
    return None


def save_report(stem: Path, text: str, summary: dict) -> None:
    from convobot import io

    io.write_text(stem.with_suffix(".md"), text)
    io.write_json(stem.with_suffix(".json"), summary)
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


def total_steps(args) -> int:
    """Warm-up, then per window one re-warm step and the timed ones."""
    return args.warmup + args.repeats * (1 + args.steps)


def check_counts(parser: argparse.ArgumentParser, args) -> None:
    if min(args.warmup, args.steps, args.repeats) < 1:
        parser.error("--warmup, --steps and --repeats must be >= 1 (the first turn builds the model)")


def prepare_process(args) -> None:
    """Threads, glibc's thresholds as convobot's cpu profile sets them, and no progress bars or per-step info
    logs interleaving with the report."""
    import datasets
    from transformers.utils import logging as hf_logging

    from convobot import cpu_memory

    if args.device == "cpu":
        cpu_memory.keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    reason = missing_inputs(args)
    if reason:
        print(reason)
        return None
    prepare_process(args)
    started = datetime.now()
    with tempfile.TemporaryDirectory(prefix="convobot-bench-") as tmp:
        setup = prepare(args, Path(tmp))
        results = measure(setup, args.configs.split(","), args.interleave)
    summary = summarise(results, setup, machine(args.device), started)
    text = render(summary)
    print(text)
    if args.save:
        save_report(args.out or RESULTS_DIR / f"train_throughput_{args.device}_{started:%Y-%m-%d}", text, summary)
    return summary


if __name__ == "__main__":
    from convobot import cpu_memory

    cpu_memory.restart_with_one_arena()  # every configuration trains in a thread: see convobot/cpu_memory.py
    main()
