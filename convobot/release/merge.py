"""Merge a run's LoRA adapter into its fp32 base, verify the result, and write a release bundle.

Examples:
    convobot merge run_dir=outputs/2026-01-01/12-00-00-000000_embedded output_dir=release/convobot-tiny
    convobot merge run_dir=outputs/demo output_dir=outputs/demo/release overwrite=true
    convobot merge run_dir=outputs/demo output_dir=release/demo export_onnx=true   # + onnx/model.onnx
    convobot merge run_dir=... output_dir=... push_to_hub=you/convobot-gpt2-alpaca  # upload (needs a token)

Nothing is written until three checks pass; VerificationError says which failed and by how much:
  (a) the merged model's logits match the adapter model's on held-out rows,
  (b) the merged weights differ from the base (an adapter that changed nothing is refused),
  (c) the saved bundle, reloaded with AutoModelForCausalLM, gives the merged model's logits.
A full fine-tune run takes the same path (its model is already "merged"), so both give the same bundle.
The bundle's layout and checksums: convobot/runs/bundle.py; its model card: convobot/release/card.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import torch
from rich.console import Console
from rich.table import Table

from convobot import atomic
from convobot.cli import run_command
from convobot.config import COMMANDS_CONF_DIR, MergeConfig
from convobot.errors import VerificationError
from convobot.model.base import ParamCount, configured_context, fit_context
from convobot.model.tokenizer import load_tokenizer
from convobot.release import card
from convobot.release.onnx_export import export_onnx, require_export_extra
from convobot.runs import bundle
from convobot.runs.loading import load_base, load_folder, load_trained
from convobot.runs.rundir import RunDir, open_run
from convobot.scoring import checks, perplexity
from convobot.scoring.generate import generation_config
from convobot.scoring.measure import Stopwatch, versions

# The ONNX parity check compares whole logits (onnxruntime returns them so): a few probe rows keep that small.
ONNX_CHECK_ROWS = 4


def trained_parameters(run: RunDir, trained) -> ParamCount:
    """What training updated: the LoRA matrices (counted before merging), or every weight."""
    total = sum(p.numel() for p in trained.parameters())
    if not run.config.peft.adapter:
        return ParamCount(total, total)
    return ParamCount(sum(p.numel() for name, p in trained.named_parameters() if "lora_" in name), total)


# --- the checks (the logit comparisons themselves are in convobot/scoring/checks.py)


def wrapped_weights(trained) -> dict[str, torch.Tensor]:
    """The base tensors LoRA wraps, by merged-model name: all that merge_and_unload writes to (GPT-2 small:
    48 of 149 tensors, 85M of 124M values)."""
    wrapped = ".base_layer."  # peft's name for the original layer inside a LoRA wrapper
    return {name.replace(wrapped, "."): tensor for name, tensor in trained.get_base_model().state_dict().items()
            if wrapped in name}


@torch.no_grad()
def lora_update_sizes(trained) -> dict[str, float]:
    """max |delta W| of each wrapped weight, by merged-model name: what merging will add, one layer at a time."""
    from peft.tuners.lora import LoraLayer

    return {f"{name}.weight": max(module.get_delta_weight(adapter).abs().max().item()
                                  for adapter in module.active_adapters)
            for name, module in trained.get_base_model().named_modules() if isinstance(module, LoraLayer)}


def check_weights_changed(before: dict[str, str], merged: dict[str, torch.Tensor], sizes: dict[str, float]) -> dict:
    """Which of the merged model's tensors differ from the base's (`before`: their digests), and by how much
    (`sizes`); refuses a merge that changed nothing. Digests, not copies: no second set of weights is held."""
    missing = sorted(before.keys() - merged.keys())
    if missing:
        raise VerificationError(f"merged model's tensors do not match the base's: {missing[:5]}")
    changed = sorted(name for name, digest in before.items() if checks.tensor_digest(merged[name]) != digest)
    if not changed:
        raise VerificationError(f"merged weights equal the base in all {len(before)} tensors merging can change: "
                                "the adapter changed nothing (untrained or zeroed?); refusing to release it")
    return {"tensors": len(merged), "tensors_compared": len(before), "tensors_changed": len(changed),
            "max_abs_change": max(sizes.get(name, 0.0) for name in changed), "changed": changed}


def check_fp32(model) -> None:
    """Merging into fp16 or quantized weights rounds the LoRA update away; the base must be full fp32."""
    quantized = getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None
    dtypes = {p.dtype for p in model.parameters()}
    if quantized or dtypes != {torch.float32}:
        raise VerificationError(f"refusing to merge into a non-fp32 base (dtypes {dtypes}, quantized={quantized})")


# --- merge


@dataclass
class HeldOut:
    """What a merge is checked and scored on: the run's held-out rows, cut to the context."""
    tokenizer: object
    probe: dict[str, torch.Tensor]  # a padded batch of the first verify_rows rows: the logit checks
    scored: object  # the first perplexity_rows examples: base vs merged perplexity
    max_length: int
    rows: int


def held_out(run: RunDir, cfg: MergeConfig) -> HeldOut:
    tokenizer = load_tokenizer(str(run.weights_dir))
    pairs = run.heldout_pairs()
    max_length = fit_context(run.config.data.max_length, configured_context(run.config.model))
    return HeldOut(tokenizer, checks.probe_batch(pairs, tokenizer, cfg.verify_rows, max_length),
                   pairs.select(range(min(cfg.perplexity_rows, len(pairs)))), max_length, len(pairs))


def merge(cfg: MergeConfig, console: Console | None = None) -> dict:
    """Merge, verify and write the release bundle of `cfg.run_dir` to `cfg.output_dir`; returns the report."""
    console = console or Console()
    output_dir = Path(cfg.output_dir)
    atomic.refuse_overwrite(output_dir, cfg.overwrite)
    if cfg.export_onnx:  # onnx is an optional extra: say so before the work, not after
        require_export_extra()
    clock = Stopwatch()
    run = open_run(cfg.run_dir)
    held = held_out(run, cfg)
    merged, merged_probe, params, verification, perplexities = merged_and_checked(run, held, cfg, clock)
    report = {
        "run_dir": str(run.path),
        "method": run.config.peft.method_name,
        "base_model": run.base_description,
        "heldout_rows": held.rows,
        "perplexity_rows": len(held.scored),
        "max_length": held.max_length,
        "completion_only": run.config.data.completion_only,
        "verification": verification,
        "perplexity": perplexities,
        "generation": asdict(cfg.generation),
        "versions": versions(),
    }
    merged.config.pad_token_id = held.tokenizer.pad_token_id
    merged.generation_config = generation_config(held.tokenizer, **asdict(cfg.generation))
    with atomic.directory(output_dir, overwrite=cfg.overwrite) as tmp:
        with clock("save"):
            merged.save_pretrained(tmp, safe_serialization=True)
            held.tokenizer.save_pretrained(tmp)
        if cfg.export_onnx:
            with clock("export onnx"):
                report["onnx"] = export_onnx(merged, tmp / "onnx", checks.first_rows(held.probe, ONNX_CHECK_ROWS),
                                             cfg.tolerance)
        del merged  # the probe keeps what (c) compares against: one model in memory at a time
        with clock("check (c): reload"):
            reloaded_probe = checks.LogitProbe.capture(load_folder(tmp), held.probe)
            verification["reloaded_vs_merged_max_abs_logit_diff"] = checks.check_within(  # (c)
                checks.max_logit_difference(merged_probe, reloaded_probe), cfg.tolerance,
                "(c) merged model vs the saved model.safetensors, reloaded")
        report["seconds"] = clock.seconds
        atomic.write_json(tmp / bundle.REPORT, report)
        licence = card.release_license(run.config, cfg.license, run.metrics().get("lineage", []))
        atomic.write_text(tmp / bundle.CARD, card.model_card(run, report, params, licence,
                                                            cfg.push_to_hub or str(output_dir)))
        bundle.write_checksums(tmp)
    print_report(report, output_dir, console)
    if cfg.push_to_hub:
        card.push_to_hub(output_dir, cfg.push_to_hub, cfg.private)
        console.print(f"uploaded to https://huggingface.co/{cfg.push_to_hub}")
    return report


def merged_and_checked(run: RunDir, held: HeldOut, cfg: MergeConfig, clock: Stopwatch):
    """The merged model, its logit probe, what trained, checks (a) and (b), and base vs merged perplexity."""
    def score(model) -> dict | None:
        if not cfg.perplexity:
            return None
        return perplexity.perplexities(model, held.scored, held.tokenizer, held.max_length, cfg.batch_tokens)

    with clock("load base"):
        base = load_base(run)
        check_fp32(base)
    with clock("probe base"):
        base_probe = checks.LogitProbe.capture(base, held.probe)
    with clock("score base"):
        base_perplexity = score(base)
    with clock("load adapter"):
        trained = load_trained(run, base)
        params = trained_parameters(run, trained)
    with clock("fingerprint base"):
        adapter = run.config.peft.adapter
        can_change = wrapped_weights(trained) if adapter else base.state_dict()
        before = {name: checks.tensor_digest(tensor) for name, tensor in can_change.items()}
        sizes = lora_update_sizes(trained) if adapter else {
            name: (trained.state_dict()[name] - tensor).abs().max().item() for name, tensor in can_change.items()}
        del can_change
    with clock("probe adapter model"):
        trained_probe = checks.LogitProbe.capture(trained, held.probe)
    with clock("merge"):
        merged = trained.merge_and_unload(safe_merge=True) if adapter else trained
    with clock("probe merged"):
        merged_probe = checks.LogitProbe.capture(merged, held.probe)
    with clock("checks (a) and (b)"):
        verification = {
            "tolerance": cfg.tolerance,
            "probe": {"rows": int(held.probe["input_ids"].shape[0]), "tokens": int(held.probe["attention_mask"].sum())},
            # (a) for a full fine-tune `merged` is the trained model itself, so this is 0 by construction.
            "adapter_vs_merged_max_abs_logit_diff": checks.check_within(
                checks.max_logit_difference(trained_probe, merged_probe), cfg.tolerance,
                "(a) adapter model vs merged model"),
            "weights_changed": check_weights_changed(before, merged.state_dict(), sizes),  # (b)
            "base_vs_merged_max_abs_logit_diff": checks.max_logit_difference(base_probe, merged_probe),
        }
    del before, trained_probe, base_probe, base, trained
    with clock("score merged"):
        merged_perplexity = score(merged)
    perplexities = {"base": base_perplexity, "merged": merged_perplexity} if cfg.perplexity else None
    return merged, merged_probe, params, verification, perplexities


def print_report(report: dict, output_dir: Path, console: Console) -> None:
    check = report["verification"]
    trained_on = "response only" if report["completion_only"] else "full sequence"
    table = Table(title=f"convobot merge · {report['method']} · {output_dir}",
                  caption=f"perplexity on {report['perplexity_rows']} of {report['heldout_rows']} held-out rows; "
                          f"training scored the {trained_on}")
    table.add_column("check")
    table.add_column("result", justify="right")
    table.add_row("(a) adapter vs merged, max |logit diff|", f"{check['adapter_vs_merged_max_abs_logit_diff']:.2e}")
    table.add_row("(b) weight tensors changed vs base",
                  f"{check['weights_changed']['tensors_changed']} / {check['weights_changed']['tensors']}")
    table.add_row("(c) reloaded vs merged, max |logit diff|", f"{check['reloaded_vs_merged_max_abs_logit_diff']:.2e}")
    if "onnx" in report:
        table.add_row("onnxruntime vs PyTorch, max |logit diff|", f"{report['onnx']['max_abs_logit_diff']:.2e}")
    if report["perplexity"]:
        for kind in ("full", "response"):
            base, merged = (report["perplexity"][m][kind]["perplexity"] for m in ("base", "merged"))
            table.add_row(f"perplexity ({kind}): base -> merged", f"{base:.3f} -> {merged:.3f}")
    console.print(table)
    console.print("seconds: " + ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in report["seconds"].items()))
    console.print(f"release bundle: {output_dir}")


@hydra.main(config_path=str(COMMANDS_CONF_DIR), config_name="merge", version_base="1.3")
def main(raw) -> None:
    """Hydra entry point: `convobot merge run_dir=... output_dir=... [overwrite=true] [export_onnx=true]`."""
    run_command("convobot-merge", MergeConfig, merge, raw)


if __name__ == "__main__":
    main()
