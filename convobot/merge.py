"""Merge a run's LoRA adapter into its fp32 base, verify the result, and write a release bundle.

Examples:
    convobot-merge run_dir=outputs/2026-01-01/12-00-00_embedded output_dir=release/convobot-tiny
    convobot-merge run_dir=outputs/demo output_dir=outputs/demo/release overwrite=true
    convobot-merge run_dir=outputs/demo output_dir=release/demo export_onnx=true   # + onnx/model.onnx
    convobot-merge run_dir=... output_dir=... push_to_hub=you/convobot-gpt2-alpaca  # upload (needs a token)

Nothing is written until three checks pass; MergeVerificationError says which failed and by how much:
  (a) the merged model's logits match the adapter model's on held-out rows,
  (b) the merged weights differ from the base (an adapter that changed nothing is refused),
  (c) the saved bundle, reloaded with AutoModelForCausalLM, gives the merged model's logits.
A full fine-tune run takes the same path (its model is already "merged"), so both give the same bundle.

This module also knows the run-dir layout, so chat and eval load models through `load_model`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import hydra
import torch
import transformers
from datasets import Dataset
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from convobot import io, metrics
from convobot.config import CONF_DIR, ConfigError, ModelSource, PeftMethod, TrainConfig, validate
from convobot.data import DataError
from convobot.generate import GenerationOptions, generation_config
from convobot.modeling import ParamCount, load_base_model, load_tokenizer
from convobot.template import format_example, format_prompt

COMMANDS_CONF_DIR = CONF_DIR / "commands"
CHECKSUMS = "SHA256SUMS"
REPORT = "merge_report.json"


class ModelPathError(FileNotFoundError):
    """A path given as a model, bundle or run dir is missing or is not one of those."""


class MergeVerificationError(RuntimeError):
    """A merge check failed; the message names the check and the measured difference."""


# --- the run dir written by convobot-train


@dataclass
class Run:
    path: Path
    config: TrainConfig

    @property
    def method(self) -> PeftMethod:
        return self.config.peft.method

    @property
    def weights_dir(self) -> Path:
        return self.path / ("adapter" if self.method == PeftMethod.lora else "model")

    @property
    def base_description(self) -> str:
        model = self.config.model
        if model.source == ModelSource.tiny:
            return f"{model.name} (random init, saved in {self.path / 'base_model'})"
        return model.name + (f"@{model.revision}" if model.revision else "")

    def metrics(self) -> dict:
        path = self.path / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def heldout_rows(self) -> list[dict]:
        path = self.path / "heldout.jsonl"
        if not path.is_file():
            raise ModelPathError(f"{path} is missing: the run's held-out rows are needed to verify and score")
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def heldout_pairs(self) -> Dataset:
        return Dataset.from_list([format_example(row) for row in self.heldout_rows()])


def open_run(path: str | Path) -> Run:
    """A convobot-train run dir: its validated config.yaml and its adapter/ or model/ folder."""
    path = Path(path)
    if not path.is_dir():
        raise ModelPathError(f"run dir {path} does not exist")
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise ModelPathError(f"{path} is not a convobot run dir: {config_file.name} is missing")
    run = Run(path, validate(OmegaConf.load(config_file)))
    if not run.weights_dir.is_dir():
        raise ModelPathError(f"{run.weights_dir} is missing: the run has not saved its "
                             f"{'adapter' if run.method == PeftMethod.lora else 'model'} (did training finish?)")
    return run


def _from_folder(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=False).eval()


def load_base(run: Run):
    """The run's base model in fp32: the saved random-init base (tiny) or the hub model at its revision."""
    if run.config.model.source == ModelSource.tiny:
        folder = run.path / "base_model"
        if not folder.is_dir():
            raise ModelPathError(f"{folder} is missing: a tiny model's random-init base is only kept there")
        return _from_folder(folder)
    tokenizer = load_tokenizer(str(run.weights_dir))
    return load_base_model(run.config.model, tokenizer, torch.float32).eval()


def load_trained(run: Run, base=None):
    """The trained model as training left it: the base with its (unmerged) adapter, or the full model."""
    if run.method == PeftMethod.full:
        return _from_folder(run.weights_dir)
    from peft import PeftModel

    return PeftModel.from_pretrained(base if base is not None else load_base(run), run.weights_dir,
                                     is_trainable=False).eval()


def load_model(path: str | Path):
    """(model, tokenizer) for chat and eval from a merged bundle / model folder, a run dir, or its adapter/."""
    path = Path(path)
    if not path.exists():
        raise ModelPathError(f"model path {path} does not exist")
    if (path / "config.json").is_file() and _has_weights(path):
        return _from_folder(path), load_tokenizer(str(path))
    if (path / "adapter_config.json").is_file():
        path = path.parent  # an adapter/ folder: its run dir knows the base
    if (path / "config.yaml").is_file():
        run = open_run(path)
        return load_trained(run), load_tokenizer(str(run.weights_dir))
    raise ModelPathError(
        f"{path} is not a model: expected a merged bundle (config.json + model.safetensors), "
        "a convobot run dir (config.yaml + adapter/ or model/), or a run's adapter/ folder")


def trained_parameters(run: Run, trained) -> ParamCount:
    """What training updated: the LoRA matrices (counted before merging), or every weight."""
    total = sum(p.numel() for p in trained.parameters())
    if run.method == PeftMethod.full:
        return ParamCount(total, total)
    return ParamCount(sum(p.numel() for name, p in trained.named_parameters() if "lora_" in name), total)


def _has_weights(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


# --- the checks


def probe_batch(pairs: Dataset, tokenizer, rows: int, max_length: int) -> dict[str, torch.Tensor]:
    """A padded batch of whole held-out rows (prompt + response) for the logit comparisons."""
    scored = metrics.tokenize_for_scoring(pairs.select(range(min(rows, len(pairs)))), tokenizer, max_length, False)
    batch = metrics.pad_batch(scored, tokenizer.pad_token_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def real_token_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at the non-padding positions only (padding positions carry no meaning)."""
    logits = model(**batch).logits.float()
    return logits[batch["attention_mask"].bool()]


def check_logits_match(reference: torch.Tensor, candidate: torch.Tensor, tolerance: float, what: str) -> float:
    diff = (reference - candidate).abs().max().item()
    if not diff <= tolerance:  # also catches NaN
        raise MergeVerificationError(f"{what}: logits differ by max |diff| = {diff:.3g} > tolerance {tolerance:g}")
    return diff


def check_weights_changed(base: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> dict:
    """How many tensors the adapter changed, and by how much; refuses a merge that changed nothing."""
    if base.keys() != merged.keys():
        raise MergeVerificationError(f"merged model's tensors do not match the base's: "
                                     f"{sorted(base.keys() ^ merged.keys())[:5]}")
    changes = {name: (merged[name].float() - base[name].float()).abs().max().item() for name in base}
    changed = sorted(name for name, change in changes.items() if change > 0)
    if not changed:
        raise MergeVerificationError(f"merged weights equal the base in all {len(base)} tensors: "
                                     "the adapter changed nothing (untrained or zeroed?); refusing to release it")
    return {"tensors": len(base), "tensors_changed": len(changed), "max_abs_change": max(changes.values()),
            "changed": changed}


def check_fp32(model) -> None:
    """Merging into fp16 or quantized weights rounds the LoRA update away; the base must be full fp32."""
    quantized = getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None
    dtypes = {p.dtype for p in model.parameters()}
    if quantized or dtypes != {torch.float32}:
        raise MergeVerificationError(f"refusing to merge into a non-fp32 base (dtypes {dtypes}, quantized={quantized})")


# --- merge


@dataclass
class MergeConfig:
    run_dir: str = MISSING
    output_dir: str = MISSING
    overwrite: bool = False
    # Max |logit difference| allowed between the adapter model, the merged model and the reloaded bundle.
    tolerance: float = 1e-4
    # Held-out rows the logit checks run on.
    verify_rows: int = 16
    # Score base and merged perplexity on the run's held-out rows (merge_report.json and model card).
    perplexity: bool = True
    batch_size: int = 16
    # Written to the bundle's generation_config.json.
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    # Model card licence; null: derived from the base model's and the data's licences where known.
    license: Optional[str] = None
    export_onnx: bool = False
    # A hub repo id to upload the bundle to (only when given; needs `huggingface-cli login`).
    push_to_hub: Optional[str] = None
    private: bool = True


ConfigStore.instance().store(name="merge_schema", node=MergeConfig)


def merge(cfg: MergeConfig, console: Console | None = None) -> dict:
    """Merge, verify and write the release bundle of `cfg.run_dir` to `cfg.output_dir`; returns the report."""
    console = console or Console()
    output_dir = Path(cfg.output_dir)
    if output_dir.exists() and not cfg.overwrite:  # fail before the work, not after
        raise FileExistsError(f"{output_dir} already exists (pass overwrite=true to replace it)")
    run = open_run(cfg.run_dir)
    tokenizer = load_tokenizer(str(run.weights_dir))
    pairs = run.heldout_pairs()
    max_length = run.config.data.max_length
    probe = probe_batch(pairs, tokenizer, cfg.verify_rows, max_length)

    def score(model) -> dict | None:
        return metrics.perplexities(model, pairs, tokenizer, max_length, cfg.batch_size) if cfg.perplexity else None

    base = load_base(run)
    check_fp32(base)
    base_perplexity = score(base)
    base_logits = real_token_logits(base, probe)
    # merge_and_unload writes into the base's tensors: keep a copy to compare against.
    base_weights = {name: tensor.detach().clone() for name, tensor in base.state_dict().items()}

    trained = load_trained(run, base)
    trained_logits = real_token_logits(trained, probe)
    params = trained_parameters(run, trained)
    merged = trained.merge_and_unload(safe_merge=True) if run.method == PeftMethod.lora else trained
    merged_logits = real_token_logits(merged, probe)
    verification = {
        "tolerance": cfg.tolerance,
        "probe": {"rows": int(probe["input_ids"].shape[0]), "tokens": int(probe["attention_mask"].sum())},
        # (a) for a full fine-tune `merged` is the trained model itself, so this is 0 by construction.
        "adapter_vs_merged_max_abs_logit_diff": check_logits_match(
            trained_logits, merged_logits, cfg.tolerance, "(a) adapter model vs merged model"),
        "weights_changed": check_weights_changed(base_weights, merged.state_dict()),  # (b)
        "base_vs_merged_max_abs_logit_diff": (base_logits - merged_logits).abs().max().item(),
    }
    del base_weights
    report = {
        "run_dir": str(run.path),
        "method": run.method.value,
        "base_model": run.base_description,
        "heldout_rows": len(pairs),
        "max_length": max_length,
        "completion_only": run.config.data.completion_only,
        "verification": verification,
        "perplexity": {"base": base_perplexity, "merged": score(merged)} if cfg.perplexity else None,
        "generation": asdict(cfg.generation),
        "versions": metrics.versions(),
    }

    merged.config.pad_token_id = tokenizer.pad_token_id
    merged.generation_config = generation_config(tokenizer, **asdict(cfg.generation))
    with io.atomic_dir(output_dir, overwrite=cfg.overwrite) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        verification["reloaded_vs_merged_max_abs_logit_diff"] = check_logits_match(  # (c)
            merged_logits, real_token_logits(_from_folder(tmp), probe), cfg.tolerance,
            "(c) merged model vs the saved model.safetensors, reloaded")
        if cfg.export_onnx:
            from convobot.export import export_onnx  # onnx is an optional extra

            report["onnx"] = export_onnx(merged, tmp / "onnx", probe, cfg.tolerance)
        io.write_json(tmp / REPORT, report)
        io.write_text(tmp / "README.md", model_card(run, report, params, cfg,
                                                   cfg.push_to_hub or str(output_dir)))
        write_checksums(tmp)
    print_report(report, output_dir, console)
    if cfg.push_to_hub:
        push_to_hub(output_dir, cfg.push_to_hub, cfg.private)
        console.print(f"uploaded to https://huggingface.co/{cfg.push_to_hub}")
    return report


# --- the bundle: checksums, model card, upload


def write_checksums(folder: Path) -> None:
    """SHA256SUMS in `sha256sum` format (check with `sha256sum -c SHA256SUMS` inside the folder)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    io.write_text(Path(folder) / CHECKSUMS, "".join(lines))


def checksum_mismatches(folder: Path) -> list[str]:
    """Files whose SHA-256 differs from SHA256SUMS, or that it lists but are missing, or it does not list."""
    folder = Path(folder)
    listed = {}
    for line in (folder / CHECKSUMS).read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS}
    problems = [f"{name}: missing" for name in sorted(listed.keys() - present)]
    problems += [f"{name}: not in {CHECKSUMS}" for name in sorted(present - listed.keys())]
    problems += [f"{name}: checksum differs" for name in sorted(present & listed.keys())
                 if _sha256(folder / name) != listed[name]]
    return problems


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Licences of the bases and data convobot ships configs for (tiny-gpt2 and bundled are convobot's own).
KNOWN_LICENSES = {"gpt2": "mit", "tiny-gpt2": "apache-2.0", "vicgalle/alpaca-gpt4": "cc-by-nc-4.0",
                  "bundled": "apache-2.0"}


def release_license(config: TrainConfig, override: str | None) -> str:
    """`override`, else the data's licence if it is non-commercial (it binds the weights trained on it),
    else the base model's; "other" when either is unknown."""
    if override:
        return override
    base, data = KNOWN_LICENSES.get(config.model.name), KNOWN_LICENSES.get(config.data.path or config.data.name)
    if base is None or data is None:
        return "other"
    return data if "nc" in data.split("-") else base


def model_card(run: Run, report: dict, params, cfg: MergeConfig, model_id: str) -> str:
    """README.md for the bundle: what it is, how it was made and scored, and a usage snippet that runs."""
    config, trained = run.config, run.metrics()
    data = config.data.path or config.data.name
    example = run.heldout_rows()[0]
    prompt = format_prompt(example["instruction"], example.get("input", ""))
    hyper = {
        "method": config.peft.method.value,
        **({"lora_r": config.peft.r, "lora_alpha": config.peft.alpha, "lora_dropout": config.peft.dropout,
            "target_modules": list(config.peft.target_modules)} if config.peft.method == PeftMethod.lora else {}),
        "optimizer": trained.get("optimizer", config.optim.name),
        "learning_rate": config.optim.lr, "epochs": config.train.epochs, "max_steps": config.train.max_steps,
        "batch_size": config.hardware.batch_size, "grad_accum": config.hardware.grad_accum,
        "max_length": config.data.max_length, "completion_only_loss": config.data.completion_only,
        "precision": trained.get("precision", config.hardware.precision.value), "seed": config.seed,
    }
    ppl, check, licence = report["perplexity"], report["verification"], release_license(config, cfg.license)
    lines = [
        "---",
        f"license: {licence}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [convobot, gpt2, alpaca, " + ("lora, merged]" if config.peft.method == PeftMethod.lora else "full-fine-tune]"),
        *([f"base_model: {config.model.name}"] if config.model.source == ModelSource.hub else []),
        *([f"datasets: [{data}]"] if config.data.source.value == "hub" else []),
        "---",
        "",
        f"# {Path(model_id).name}",
        "",
        f"GPT-2 fine-tuned on Alpaca-format instructions with convobot ({config.peft.method.value}"
        f"{', adapter merged into the fp32 base' if config.peft.method == PeftMethod.lora else ''}).",
        "",
        f"- **Base model:** {run.base_description}",
        f"- **Data:** {data} ({trained.get('data', {}).get('train_rows', '?')} training rows, "
        f"{report['heldout_rows']} held-out rows)",
        f"- **Trainable parameters:** {params.trainable:,} of {params.total:,} ({params.percent:.2f}%)",
        f"- **Licence:** {licence} (the data's licence where it is non-commercial, else the base "
        "model's; check both licences before you redistribute)",
        "",
        "## Prompt template (Stanford Alpaca; the answer ends with EOS)",
        "",
        "```", format_prompt("{instruction}", "{input}").rstrip("\n"), "```",
        "",
        "Without an input, the `### Input:` block is left out.",
        "",
        "## Hyperparameters",
        "",
        "```json", json.dumps(hyper, indent=2), "```",
        "",
        "## Metrics (held-out rows)",
        "",
        "| model | perplexity (full sequence) | perplexity (response only) |",
        "|---|---|---|",
    ]
    if ppl:
        for name in ("base", "merged"):
            lines.append(f"| {name} | {ppl[name]['full']['perplexity']:.3f} | {ppl[name]['response']['perplexity']:.3f} |")
    if "exact_match" in trained:
        lines += ["", f"Exact match on held-out bundled tasks after training: {trained['exact_match']:.1%}."]
    lines += [
        "",
        f"Merge checks (tolerance {check['tolerance']:g}): adapter vs merged logits max |diff| "
        f"{check['adapter_vs_merged_max_abs_logit_diff']:.2g}; saved and reloaded vs merged "
        f"{check['reloaded_vs_merged_max_abs_logit_diff']:.2g}; {check['weights_changed']['tensors_changed']} of "
        f"{check['weights_changed']['tensors']} weight tensors changed. Details: `{REPORT}`; file hashes: `{CHECKSUMS}`.",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model_id = {model_id!r}",
        "tokenizer = AutoTokenizer.from_pretrained(model_id)",
        "model = AutoModelForCausalLM.from_pretrained(model_id, use_safetensors=True)",
        f"prompt = {prompt!r}",
        'inputs = tokenizer(prompt, return_tensors="pt")',
        "output = model.generate(**inputs)  # sampling settings and pad = eos come from generation_config.json",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        f"Or: `convobot-chat model={model_id}`.",
        "",
    ]
    return "\n".join(lines)


def push_to_hub(folder: Path, repo_id: str, private: bool = True) -> None:
    """Upload the verified bundle (only ever called for an explicit push_to_hub=<repo id>)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="convobot release bundle")


def print_report(report: dict, output_dir: Path, console: Console) -> None:
    check = report["verification"]
    trained_on = "response only" if report["completion_only"] else "full sequence"
    table = Table(title=f"convobot-merge · {report['method']} · {output_dir}",
                  caption=f"perplexity on {report['heldout_rows']} held-out rows; training scored the {trained_on}")
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
    console.print(f"release bundle: {output_dir}")


# Mistakes a user can make; the commands report them in one line instead of a traceback.
USER_ERRORS = (ModelPathError, MergeVerificationError, FileExistsError, ConfigError, DataError)


def run_command(name: str, command, raw):
    """Run `command` on the typed form of a composed command config (see conf/commands/)."""
    # Per-file "Loading weights" and per-dataset "Map" bars would bury the report.
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    # peft still asks for the old name; transformers warns on every adapter load.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        return command(OmegaConf.to_object(raw))
    except MissingMandatoryValue as err:
        raise SystemExit(f"{name}: {err.full_key}=... is required (see its config, conf/commands/)") from err
    except USER_ERRORS as err:
        raise SystemExit(f"{name}: {type(err).__name__}: {err}") from err


@hydra.main(config_path=str(COMMANDS_CONF_DIR), config_name="merge", version_base="1.3")
def main(raw) -> None:
    """Hydra entry point: `convobot-merge run_dir=... output_dir=... [overwrite=true] [export_onnx=true]`."""
    run_command("convobot-merge", merge, raw)


if __name__ == "__main__":
    main()
