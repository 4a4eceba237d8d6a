"""A release bundle: the merged model's save_pretrained folder plus what makes it a release (a model card with
its licence, merge_report.json, SHA256SUMS), and its upload to the Hugging Face Hub.

    <bundle>/
      config.json, generation_config.json, model.safetensors, tokenizer files   (AutoModelForCausalLM loads it)
      chat_template.jinja the chat template: the training prompt from chat messages (pipelines, servers)
      README.md           model card: what it is, how it was trained and scored, a usage snippet that runs
      merge_report.json   the merge checks, base vs merged perplexity, versions; the run it came from
      SHA256SUMS          every file's hash (`sha256sum -c SHA256SUMS` inside the bundle)
      onnx/               model.onnx (+ .data), when exported
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from convobot import atomic
from convobot.config import DataSource, ModelSource, PeftMethod, TrainConfig
from convobot.errors import VerificationError
from convobot.template import format_prompt, user_message

if TYPE_CHECKING:  # the run dir module loads bundles, so it imports this one
    from convobot.modeling import ParamCount
    from convobot.rundir import RunDir

log = logging.getLogger(__name__)

CHECKSUMS = "SHA256SUMS"
REPORT = "merge_report.json"
CARD = "README.md"


def is_model_folder(folder: Path) -> bool:
    """A save_pretrained folder with safetensors weights: a bundle, or a full fine-tune's model/."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and ((folder / "model.safetensors").is_file()
                                                   or (folder / "model.safetensors.index.json").is_file())


def read_report(folder: Path) -> dict | None:
    path = Path(folder) / REPORT
    return json.loads(path.read_text()) if path.is_file() else None


def recorded_run_dir(folder: Path) -> Path | None:
    """The run dir a bundle was merged from, as its merge_report.json recorded it (it may since be gone)."""
    report = read_report(folder)
    return Path(report["run_dir"]) if report else None


def verify(folder: Path, enabled: bool = True) -> None:
    """Refuse a bundle whose files differ from its SHA256SUMS, naming them (a folder without one has nothing to
    check against). `enabled=False` skips the check, with a warning."""
    if not (Path(folder) / CHECKSUMS).is_file():
        return
    if not enabled:
        log.warning("verify_checksums=false: %s is used without checking its %s", folder, CHECKSUMS)
        return
    problems = checksum_mismatches(folder)
    if problems:
        raise VerificationError(f"{folder} does not match its {CHECKSUMS}: {'; '.join(problems[:5])} (a file was "
                                "changed or damaged; verify_checksums=false uses it anyway)")


def add_export(folder: Path, export_dir: Path, result: dict) -> None:
    """Record an export written into the bundle (`export_dir`, a folder directly inside it; one written elsewhere is
    not the bundle's) in merge_report.json and hash its files: only if the rest of the bundle still matches its
    SHA256SUMS (a bundle that does not verify is never re-signed)."""
    folder, name = Path(folder), Path(export_dir).name
    if Path(export_dir).resolve().parent != folder.resolve():
        return
    signed = (folder / CHECKSUMS).is_file()
    if signed:
        problems = [p for p in checksum_mismatches(folder) if not p.startswith(f"{name}/")]
        if problems:
            log.warning("%s does not match its %s (%s): not recording the export in it", folder, CHECKSUMS,
                        "; ".join(problems[:3]))
            return
    report = read_report(folder)
    if report is not None:
        atomic.write_json(folder / REPORT, report | {name: result})
    if signed:
        write_checksums(folder)


def write_checksums(folder: Path) -> None:
    """SHA256SUMS in `sha256sum` format (check with `sha256sum -c SHA256SUMS` inside the folder)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    atomic.write_text(Path(folder) / CHECKSUMS, "".join(lines))


def checksum_mismatches(folder: Path) -> list[str]:
    """Files whose SHA-256 differs from SHA256SUMS, or that it lists but are missing, or it does not list."""
    folder = Path(folder)
    listed, problems = {}, []
    for number, line in enumerate((folder / CHECKSUMS).read_text(errors="replace").splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            problems.append(f"{CHECKSUMS} line {number}: not '<sha256>  <file>'")
        listed[name] = digest
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS}
    problems += [f"{name}: missing" for name in sorted(listed.keys() - present) if name]
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


def model_card(run: RunDir, report: dict, params: ParamCount, licence: str, model_id: str) -> str:
    """README.md for the bundle: what it is, how it was made and scored, and a usage snippet that runs."""
    config, trained = run.config, run.metrics()
    data = config.data.path or config.data.name
    example = run.heldout_rows()[0]
    messages = example_messages(example)
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
    ppl, check = report["perplexity"], report["verification"]
    lines = [
        "---",
        f"license: {licence}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [convobot, gpt2, alpaca, " + ("lora, merged]" if config.peft.method == PeftMethod.lora else "full-fine-tune]"),
        *([f"base_model: {config.model.name}"] if config.model.source == ModelSource.hub else []),
        *([f"datasets: [{data}]"] if config.data.source == DataSource.hub else []),
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
        "Without an input, the `### Input:` block is left out. The tokenizer's chat template (`chat_template.jinja`) "
        "builds exactly this prompt from chat messages: a user turn's `input` key (or, from clients that send only "
        "role and content, `instruction\\n\\n### Input:\\ninput` as its content) is the input, a system message "
        "replaces the first line, and further turns follow as `### Instruction:` / `### Response:` blocks.",
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
        "from transformers import pipeline",
        "",
        f"chat = pipeline('text-generation', model={model_id!r})",
        f"messages = {messages!r}",
        "reply = chat(messages, max_new_tokens=64)[0]['generated_text'][-1]  # settings from generation_config.json",
        "print(reply['content'])",
        "```",
        "",
        f"Or: `convobot-chat model={model_id}` (a multi-turn REPL), `convobot-serve model={model_id}` (an "
        "OpenAI-compatible server).",
        "",
    ]
    return "\n".join(lines)


def example_messages(row: dict) -> list[dict]:
    """A held-out row as the chat messages a client would send: the Alpaca row's one user turn, or a
    conversation up to its last answer."""
    if "messages" in row:
        return [{key: value for key, value in message.items() if value is not None} for message in row["messages"][:-1]]
    return [user_message(row["instruction"], row.get("input", ""))]


def push_to_hub(folder: Path, repo_id: str, private: bool = True) -> None:
    """Upload the verified bundle (only ever called for an explicit push_to_hub=<repo id>)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="convobot release bundle")
