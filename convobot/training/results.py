"""The one-screen results table printed at the end of a training run: held-out metrics before and after,
what trained, how fast, in how much memory, and a few sample answers."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from convobot.template import answer_of


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def print_results(results: dict, run_dir: Path, samples: list[tuple[dict, str]], cut: int = 0,
                  console: Console | None = None):
    """The held-out metrics before and after, the run's facts, and sample answers (`cut`: how many of their prompts
    were cut to fit the context)."""
    console = console or Console()
    before = results.get("before") or {}
    stage = results.get("stage", "sft")
    title = f"convobot · {results['experiment']} · {results['method']}" + (f" · {stage}" if stage != "sft" else "")
    table = Table(title=title, show_lines=False)
    table.add_column("held-out metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("loss (nats/token)", _fmt(before.get("eval_loss")), _fmt(results.get("eval_loss")))
    table.add_row("perplexity", _fmt(before.get("eval_perplexity"), ".3f"), _fmt(results.get("eval_perplexity"), ".3f"))
    if "exact_match" in results:
        table.add_row("exact match", _fmt(before.get("exact_match"), ".1%"), _fmt(results["exact_match"], ".1%"))
    console.print(table)

    facts = Table.grid(padding=(0, 2))
    facts.add_row("train loss", _fmt(results["train_loss"]))
    if results.get("lineage"):
        facts.add_row("started from", " → ".join(f"{step['stage']} {step['run']}" for step in results["lineage"]))
    if results.get("stage_metrics"):
        facts.add_row(f"{stage} (last logged)", ", ".join(f"{key} {value:.4g}" for key, value in
                                                          sorted(results["stage_metrics"].items())))
    facts.add_row("trainable params",
                  f"{results['trainable_params']:,} / {results['total_params']:,} ({results['trainable_percent']:.2f}%)")
    if results["train_tokens"] is None:
        facts.add_row("trained tokens", f"not counted by the trainer; {results['steps']} steps in "
                                        f"{results['train_seconds']:.1f} s")
    else:
        facts.add_row("trained tokens", f"{results['train_tokens']:,} in {results['train_seconds']:.1f} s "
                                        f"({results['tokens_per_second']:,.0f} tokens/s)")
    facts.add_row("peak memory", f"{results['peak_memory_bytes'] / 2**20:,.0f} MiB ({results['device']})")
    facts.add_row("optimizer", results["optimizer"])
    if results.get("optimizer_fallback_reason"):
        facts.add_row("[bold red]optimizer fallback[/]", results["optimizer_fallback_reason"])
    facts.add_row("run dir", str(run_dir))
    console.print(facts)

    for row, generated in samples:
        console.print(f"[bold]>[/] {_asked(row)}\n  [green]model:[/] {generated.strip()!r}   "
                      f"[dim]expected: {answer_of(row)!r}[/]")
    if cut:
        console.print(f"[dim]{cut} of {len(samples)} sample prompts were cut from the left (oldest turns first) to "
                      "leave room for the answer in the model's context[/]")


def _asked(row: dict) -> str:
    """A sample's question in one line: instruction | input, or a conversation's user turns joined by " / "."""
    if "messages" in row:
        return " / ".join(m["content"] + (f" | {m['input']}" if m.get("input") else "")
                          for m in row["messages"] if m["role"] == "user")
    return row["instruction"] + (f" | {row['input']}" if row.get("input") else "")
