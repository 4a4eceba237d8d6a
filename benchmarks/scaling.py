"""Trained tokens/s and peak memory of convobot's default path against sequence length and batch size, as a figure.

Examples:
    python benchmarks/scaling.py                                  # CPU, LoRA: 4 lengths x 3 batch sizes, ~7 min
    python benchmarks/scaling.py --configs lora,full --lengths 128,512 --batches 1,4
    python benchmarks/scaling.py --device cuda --configs lora,full --steps 10   # on a GPU (rtx3050_4gb profile)

Each point trains GPT-2 small (random init) on the alpaca-gpt4 rows through benchmarks/harness.py, the same
builders as benchmarks/train_throughput.py, one point at a time, each freed before the next: --warmup steps excluded, then
--repeats windows of --steps steps. The sequence length is data.max_length: packed, every sequence holds close
to that many tokens (rows longer than it are truncated, as training would). With packing a step of batch B is B
accumulated micro-batches of one sequence, so memory should stay flat in B while the optimizer step is shared by
more tokens. Writes
benchmarks/results/scaling_<device>_<date>.{png,md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from datetime import datetime
from pathlib import Path

import harness

LENGTHS = "128,256,512,1024"
BATCHES = "1,2,4"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_arguments(parser)
    parser.add_argument("--configs", default="lora", help=f"comma-separated, from {list(harness.CONVOBOT_CONFIGS)}")
    parser.add_argument("--lengths", default=LENGTHS, help="data.max_length values")
    parser.add_argument("--batches", default=BATCHES, help="hardware.batch_size values")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    args.configs = args.configs.split(",")
    args.lengths = [int(n) for n in args.lengths.split(",")]
    args.batches = [int(n) for n in args.batches.split(",")]
    unknown = [n for n in args.configs if n not in harness.CONVOBOT_CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {list(harness.CONVOBOT_CONFIGS)}")
    if min(args.warmup, args.steps, args.repeats) < 1:
        parser.error("--warmup, --steps and --repeats must be >= 1 (the first turn builds the model)")
    return args


def grid(args) -> list[harness.Settings]:
    """One Settings per (sequence length, batch size) point."""
    first = harness.Settings(device=args.device, rows=args.rows, smoke=args.smoke, max_length=args.lengths[0],
                             batch_size=args.batches[0], warmup=args.warmup, steps=args.steps, repeats=args.repeats)
    return [dataclasses.replace(first, max_length=length, batch_size=batch)
            for length in args.lengths for batch in args.batches]


def measure_grid(setup: harness.Setup, args) -> list[dict]:
    points = []
    for name in args.configs:
        for settings in grid(args):
            length, batch = settings.max_length, settings.batch_size
            result = harness.measure(setup, settings, [name], interleave=False)[0]
            points.append({"config": name, "seq_length": length, "batch_size": batch,
                           "tokens_per_second": result.tokens_per_second,
                           "peak_memory_mib": None if result.peak_memory_bytes is None
                           else result.peak_memory_bytes / harness.MiB,
                           "load_average_1min": max(result.load), "description": result.description})
            print(f"{name} seq {length} batch {batch}: {result.tokens_per_second:,.1f} tokens/s, "
                  f"peak {result.peak_memory_bytes} bytes", flush=True)
    return points


def plot(points: list[dict], title: str, memory_label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (name, batch), rows in _series(points).items():
        lengths = [p["seq_length"] for p in rows]
        label = f"{name}, batch {batch}"
        speed.plot(lengths, [p["tokens_per_second"] for p in rows], marker="o", label=label)
        memory.plot(lengths, [p["peak_memory_mib"] for p in rows], marker="o", label=label)
    for axis, ylabel in ((speed, "trained tokens / s"), (memory, f"{memory_label} (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted({p["seq_length"] for p in points}), labels=sorted({p["seq_length"] for p in points}))
        axis.set_xlabel("sequence length (data.max_length, packed)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    speed.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.tmp{path.suffix}")  # written whole, then renamed into place
    try:
        figure.savefig(staged, dpi=120)
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
        plt.close(figure)


def _series(points: list[dict]) -> dict:
    series: dict = {}
    for point in points:
        series.setdefault((point["config"], point["batch_size"]), []).append(point)
    return series


def render(summary: dict) -> str:
    info = summary["machine"]
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_cores']} cores)"
    lines = [f"# Scaling: convobot default path on GPT-2 small ({summary['device']})", "",
             f"- date: {summary['date']}; machine: {where}, {info['torch_threads']} torch thread(s); "
             f"wall time {summary['wall_seconds']:.0f} s",
             f"- {summary['settings']['warmup']} warm-up steps excluded, then {summary['settings']['repeats']} "
             f"window(s) of {summary['settings']['steps']} steps per point; figure: {summary['figure']}"]
    if summary["note"]:
        lines.append(f"- note: {summary['note']}")
    lines += ["", "| config | seq length | batch | trained tokens/s | peak memory (MiB) | load (1 min) |",
              "|---|---|---|---|---|---|"]
    for p in summary["points"]:
        memory = "n/a" if p["peak_memory_mib"] is None else f"{p['peak_memory_mib']:,.0f}"
        lines.append(f"| {p['config']} | {p['seq_length']} | {p['batch_size']} | {p['tokens_per_second']:,.1f} "
                     f"| {memory} | {p['load_average_1min']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    reason = harness.missing_inputs(args.device, args.rows)
    if reason:
        print(reason)
        return None
    harness.prepare_process(args.device, args.threads)
    started = datetime.now()
    with tempfile.TemporaryDirectory(prefix="convobot-scaling-") as tmp:
        setup = harness.prepare(grid(args)[0], Path(tmp))
        points = measure_grid(setup, args)
    stem = args.out or harness.RESULTS_DIR / f"scaling_{args.device}_{started:%Y-%m-%d}"
    figure = stem.with_suffix(".png")
    summary = {"benchmark": "scaling", "date": started.isoformat(timespec="seconds"),
               "wall_seconds": (datetime.now() - started).total_seconds(), "device": args.device,
               "machine": harness.machine(args.device), "note": args.note, "figure": figure.name,
               "settings": {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
                            "rows": str(args.rows), "smoke_model": args.smoke},
               "points": points}
    plot(points, f"convobot on GPT-2 small, {args.device}: {summary['date']}",
         "peak VRAM" if args.device == "cuda" else "peak RSS growth", figure)
    print(f"wrote {figure}")
    text = render(summary)
    print(text)
    harness.save_report(stem, text, summary)
    return summary


if __name__ == "__main__":
    from convobot.model import cpu_memory

    cpu_memory.restart_with_one_arena()  # every configuration trains in a thread: see convobot/cpu_memory.py
    main()
