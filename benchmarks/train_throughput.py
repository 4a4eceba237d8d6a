"""Trained tokens per second of GPT-2 small: the reference setup against convobot's fast path, side by side.

Examples:
    python benchmarks/train_throughput.py                        # CPU, ~5 min on 2 cores (make bench)
    python benchmarks/train_throughput.py --steps 2 --repeats 2  # quicker, noisier
    python benchmarks/train_throughput.py --device cuda          # GPU variant: fp16, 8-bit AdamW, rtx3050_4gb
    python benchmarks/train_throughput.py --configs reference,lora,lora_chunked_head,lora_dropout --no-save

Everything runs in ONE process on the same rows (../shared/data/alpaca_gpt4 through convobot.data.examples, the real
GPT-2 tokenizer from ../shared/data/gpt2-tokenizer) and the real GPT-2 small architecture (GPT2Config() sizes,
124M parameters, random init, so nothing is downloaded):
  reference   the reference run: transformers' Trainer with its defaults, full fine-tune, batch 2, rows tokenized
              by a plain tokenizer and padded by DataCollatorForLanguageModeling, GPT-2's dropout, the loss on
              the whole text, AdamW (fused) (fp16 mixed precision on CUDA)
  lora, full  convobot.training.recipe.build_trainer with the default config for the hardware profile (cpu, or
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
import tempfile
from datetime import datetime
from pathlib import Path

import torch
from harness import (
    ALPACA_3_EPOCH_TOKENS,
    CONVOBOT_CONFIGS,
    DEFAULT_CONFIGS,
    REFERENCE,
    RESULTS_DIR,
    Measurement,
    MiB,
    Settings,
    Setup,
    add_common_arguments,
    machine,
    measure,
    missing_inputs,
    prepare,
    prepare_process,
    save_report,
)


def tabulate(results: list[Measurement], setup: Setup, args, info: dict, started: datetime) -> dict:
    """The results file's content: per configuration its rate, windows, memory and ratio to the reference."""
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
    where = info.get("gpu") or (f"{info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads; "
                                f"vector ISA: {', '.join(info['isa']) or '?'})")
    lines = [f"# Training throughput: GPT-2 small, reference vs convobot ({summary['device']})", "",
             f"- date: {summary['date']}; machine: {where}, {info['memory_gib']} GiB RAM"
             + (f", GPU memory {info['gpu_memory_gib']} GiB" if "gpu" in info else ""),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
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
    if min(args.warmup, args.steps, args.repeats) < 1:
        parser.error("--warmup, --steps and --repeats must be >= 1 (the first turn builds the model)")
    unknown = [n for n in args.configs.split(",") if n != REFERENCE and n not in CONVOBOT_CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {[REFERENCE, *CONVOBOT_CONFIGS]}")
    return args


def settings_of(args) -> Settings:
    return Settings(device=args.device, rows=args.rows, smoke=args.smoke, max_length=args.max_length,
                    batch_size=args.batch_size, warmup=args.warmup, steps=args.steps, repeats=args.repeats)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    reason = missing_inputs(args.device, args.rows)
    if reason:
        print(reason)
        return None
    prepare_process(args.device, args.threads)
    settings = settings_of(args)
    started = datetime.now()
    with tempfile.TemporaryDirectory(prefix="convobot-bench-") as tmp:
        setup = prepare(settings, Path(tmp))
        results = measure(setup, settings, args.configs.split(","), args.interleave)
    summary = tabulate(results, setup, args, machine(args.device), started)
    text = render(summary)
    print(text)
    if args.save:
        save_report(args.out or RESULTS_DIR / f"train_throughput_{args.device}_{started:%Y-%m-%d}", text, summary)
    return summary


if __name__ == "__main__":
    from convobot.model import cpu_memory

    cpu_memory.restart_with_one_arena()  # every configuration trains in a thread: see convobot/cpu_memory.py
    main()
