"""The model card (README.md) of a release bundle: what the model is, what it was trained on and under which licence,
how it was trained and scored, and a usage snippet that runs; and the bundle's upload to the Hugging Face Hub."""

from __future__ import annotations

import json
from pathlib import Path

from convobot.config import DataFormat, DataSource, ModelSource, TrainConfig
from convobot.model.base import ParamCount
from convobot.runs.bundle import CHECKSUMS, REPORT
from convobot.runs.rundir import RunDir
from convobot.template import format_prompt, user_message

# What each data format is, in the card's words.
DATA_KINDS = {
    DataFormat.alpaca: "Alpaca-format instructions (instruction, optional input, output), the loss on the response",
    DataFormat.messages: "conversations (OpenAI-style `messages`), the loss on every assistant turn",
    DataFormat.sharegpt: "conversations (ShareGPT `conversations`), the loss on every assistant turn",
    DataFormat.preference: "preference pairs (a prompt with a chosen and a rejected answer)",
    DataFormat.unpaired: "answers labelled desirable or undesirable",
}


DATA_TAGS = {DataFormat.alpaca: "alpaca", DataFormat.preference: "preference", DataFormat.unpaired: "preference"}


def release_license(config: TrainConfig, override: str | None, lineage: list[dict] = ()) -> str:
    """`override`, else the data's licence if it is non-commercial (it binds the weights trained on it), else the
    base model's; "other" when either is unknown (the `license:` keys of conf/model and conf/data). The data of
    every earlier stage (`lineage`) counts as this run's does."""
    if override:
        return override
    licences = [config.data.license, *(stage.get("data_license") for stage in lineage)]
    if config.model.license is None or None in licences:
        return "other"
    return next((data for data in licences if "nc" in data.split("-")), config.model.license)


def model_card(run: RunDir, report: dict, params: ParamCount, licence: str, model_id: str) -> str:
    """README.md for the bundle: what it is, how it was made and scored, and a usage snippet that runs."""
    return "\n".join([*front_matter(run.config, licence), *summary(run, report, params, licence, model_id),
                      *prompt_format(), *hyperparameters(run), *scores(run, report),
                      *usage(model_id, example_messages(run.heldout_rows()[0]))])


def front_matter(config: TrainConfig, licence: str) -> list[str]:
    kind = ["full-fine-tune"] if config.peft.method_name == "full" else [config.peft.method_name, "merged"]
    kind += [config.stage.name.value] if config.stage.name.value != "sft" else []
    return ["---", f"license: {licence}", "library_name: transformers", "pipeline_tag: text-generation",
            f"tags: [convobot, gpt2, {DATA_TAGS.get(config.data.format, 'conversational')}, "
            f"{', '.join(kind)}]",
            *([f"base_model: {config.model.name}"] if config.model.source == ModelSource.hub else []),
            *([f"datasets: [{config.data.origin}]"] if config.data.source == DataSource.hub else []),
            "---", ""]


def summary(run: RunDir, report: dict, params: ParamCount, licence: str, model_id: str) -> list[str]:
    config, trained = run.config, run.metrics()
    method = config.peft.method_name
    merged = ", adapter merged into the fp32 base" if config.peft.adapter else ""
    data = config.data.origin + (" (convobot's bundled tasks)" if config.data.source == DataSource.bundled else "")
    stages = [f"{stage['stage']} ({stage['peft']}) on {stage['data']}" for stage in trained.get("lineage", [])]
    stages.append(f"{config.stage.name.value} ({config.peft.name}) on {config.data.origin}")
    return [
        f"# {Path(model_id).name}", "",
        f"GPT-2 fine-tuned with convobot ({method}{merged}) on {DATA_KINDS[config.data.format]}.", "",
        *([f"- **Stages:** {', then '.join(stages)}"] if len(stages) > 1 or config.stage.name.value != "sft" else []),
        f"- **Base model:** {run.base_description}",
        f"- **Data:** {data}: {trained.get('data', {}).get('train_rows', '?')} training rows, "
        f"{report['heldout_rows']} held-out rows",
        f"- **Trainable parameters:** {params.trainable:,} of {params.total:,} ({params.percent:.2f}%)",
        f"- **Licence:** {licence} (the data's licence where it is non-commercial, else the base model's: base "
        f"{config.model.license or 'unknown'}, data {config.data.license or 'unknown'}; check both before you "
        "redistribute)", "",
    ]


def prompt_format() -> list[str]:
    return [
        "## Prompt template (Stanford Alpaca; the answer ends with EOS)", "",
        "```", format_prompt("{instruction}", "{input}").rstrip("\n"), "```", "",
        "Without an input, the `### Input:` block is left out. The tokenizer's chat template (`chat_template.jinja`) "
        "builds exactly this prompt from chat messages: a user turn's `input` key (or, from clients that send only "
        "role and content, `instruction\\n\\n### Input:\\ninput` as its content) is the input, a system message "
        "replaces the first line, and further turns follow as `### Instruction:` / `### Response:` blocks.", "",
    ]


def hyperparameters(run: RunDir) -> list[str]:
    config, trained = run.config, run.metrics()
    peft = config.peft
    hyper = {
        "method": peft.method_name,
        **({"lora_r": peft.r, "lora_alpha": peft.alpha, "lora_dropout": peft.dropout,
            "target_modules": list(peft.target_modules)} if peft.adapter else {}),
        **({"quantization": peft.quantization, "double_quant": peft.double_quant} if peft.quantization else {}),
        "optimizer": trained.get("optimizer", config.optim.name),
        "learning_rate": config.optim.lr, "epochs": config.train.epochs, "max_steps": config.train.max_steps,
        "batch_size": config.hardware.batch_size, "grad_accum": config.hardware.grad_accum,
        "max_length": config.data.max_length, "completion_only_loss": config.data.completion_only,
        "precision": trained.get("precision", config.hardware.precision.value), "seed": config.seed,
    }
    return ["## Hyperparameters", "", "```json", json.dumps(hyper, indent=2), "```", ""]


def scores(run: RunDir, report: dict) -> list[str]:
    ppl, check, trained = report["perplexity"], report["verification"], run.metrics()
    lines = ["## Metrics (held-out rows)", "", "| model | perplexity (full sequence) | perplexity (response only) |",
             "|---|---|---|"]
    for name in ("base", "merged") if ppl else ():
        lines.append(f"| {name} | {ppl[name]['full']['perplexity']:.3f} | {ppl[name]['response']['perplexity']:.3f} |")
    if "exact_match" in trained:
        lines += ["", f"Exact match on held-out bundled tasks after training: {trained['exact_match']:.1%}."]
    return lines + [
        "",
        f"Merge checks (tolerance {check['tolerance']:g}): adapter vs merged logits max |diff| "
        f"{check['adapter_vs_merged_max_abs_logit_diff']:.2g}; saved and reloaded vs merged "
        f"{check['reloaded_vs_merged_max_abs_logit_diff']:.2g}; {check['weights_changed']['tensors_changed']} of "
        f"{check['weights_changed']['tensors']} weight tensors changed. Details: `{REPORT}`; file hashes: `{CHECKSUMS}`.",
        "",
    ]


def usage(model_id: str, messages: list[dict]) -> list[str]:
    return [
        "## Usage", "",
        "```python",
        "from transformers import pipeline",
        "",
        f"chat = pipeline('text-generation', model={model_id!r})",
        f"messages = {messages!r}",
        "reply = chat(messages, max_new_tokens=64)[0]['generated_text'][-1]  # settings from generation_config.json",
        "print(reply['content'])",
        "```", "",
        f"Or: `convobot chat model={model_id}` (a multi-turn REPL), `convobot serve model={model_id}` (an "
        "OpenAI-compatible server).", "",
    ]


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
