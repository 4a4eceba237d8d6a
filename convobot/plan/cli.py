"""convobot plan: the plan of a training config as a table, its verdict, and what to change if it does not fit.

    convobot plan experiment=seed_repro hardware=rtx3050_4gb
    convobot plan -m experiment=seed_repro hardware=rtx3050_4gb,rtx4090_24gb peft=lora,full
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from convobot import atomic
from convobot.cli import one_line_errors, quiet_libraries
from convobot.config import CONF_DIR, validate
from convobot.plan.advice import refusal
from convobot.plan.estimator import Plan, estimate
from convobot.plan.formulas import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, GiB


def print_plan(plan: Plan, console: Console | None = None) -> None:
    console = console or Console()
    peak_parts = plan.phase_parts[plan.peak_phase]
    table = Table(title=f"memory plan · {plan.title}")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    table.add_column("in peak", justify="center")
    table.add_column("what")
    for part in plan.parts.values():
        table.add_row(part.name, f"{part.bytes / GiB:.3f}", "x" if part.name in peak_parts else "", part.detail)
    if plan.device == "cuda":
        table.add_row("CUDA context + allocator", f"{plan.overhead / GiB:.3f}", "x",
                      f"assumed: {CUDA_CONTEXT_BYTES / GiB:.1f} GiB + {ALLOCATOR_SLACK:.0%} of allocated")
    console.print(table)
    for phase, size in plan.phases.items():
        marker = "  <- peak" if phase == plan.peak_phase else ""
        console.print(f"  {phase:<28} {size / GiB:7.3f} GiB allocated{marker}")
    for note in plan.notes:
        console.print(f"  [dim]note: {note}[/]")
    if plan.budget is None:
        console.print(f"peak {plan.total / GiB:.2f} GiB; no budget (hardware.vram_gb is null)")
    elif plan.fits:
        console.print(f"[bold green]FITS[/]: peak {plan.total / GiB:.2f} GiB of {plan.budget / GiB:.1f} GiB "
                      f"({(plan.budget - plan.total) / GiB:.2f} GiB, {1 - plan.total / plan.budget:.0%} to spare)")
    else:
        console.print(f"[bold red]DOES NOT FIT[/]: peak {plan.total / GiB:.2f} GiB of {plan.budget / GiB:.1f} GiB")


@hydra.main(config_path=str(CONF_DIR), config_name="plan", version_base="1.3")
def main(raw: DictConfig) -> float:
    """`convobot plan [train overrides]`: print the plan; exit status 1 if it does not fit.
    With -m, each combination's plan.json goes to its job dir and nothing stops the sweep."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    quiet_libraries()
    with one_line_errors("convobot-plan", reraise=multirun):
        cfg = validate(raw)
        plan = estimate(cfg)
    print_plan(plan)
    if not plan.fits:
        print(refusal(plan, cfg))
    if multirun:
        atomic.write_json(Path(HydraConfig.get().runtime.output_dir) / "plan.json", plan.to_dict())
    elif not plan.fits:
        raise SystemExit(1)
    return plan.total / GiB


if __name__ == "__main__":
    main()
