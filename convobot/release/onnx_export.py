"""Export a merged bundle to ONNX, and check that onnxruntime gives PyTorch's logits.

Examples:
    convobot export-onnx model=release/convobot-gpt2-alpaca      # adds onnx/model.onnx (+ .data) to the bundle
    convobot export-onnx model=outputs/demo/release output_dir=onnx/demo
    convobot merge run_dir=outputs/demo output_dir=release/demo export_onnx=true   # the same, while merging

optimum is the usual exporter, but no optimum release exports ONNX with transformers 5.x (optimum 2.x has
no ONNX exporter; optimum-onnx requires transformers < 4.58), so this uses torch.onnx.export's dynamo
exporter (needs onnxscript). The graph maps
input_ids and attention_mask (batch and sequence length dynamic) to the logits of every position,
without a KV cache. Exporting into a bundle refreshes its SHA256SUMS and merge_report.json.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import hydra
import torch
from rich.console import Console

from convobot import atomic
from convobot.cli import run_command
from convobot.config import COMMANDS_CONF_DIR, ExportConfig
from convobot.errors import MissingExtraError, ModelPathError
from convobot.runs import bundle
from convobot.runs.loading import load_model
from convobot.scoring import checks, perplexity
from convobot.template import format_prompt

INPUTS = ("input_ids", "attention_mask")


class LogitsOnly(torch.nn.Module):
    """A causal LM as a function (input_ids, attention_mask) -> logits: no cache, no output dict."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export_onnx(model, folder: Path, probe: dict[str, torch.Tensor], tolerance: float = 1e-4,
                opset: int | None = None) -> dict:
    """Write `folder`/model.onnx, run it with onnxruntime and compare its logits with PyTorch's.

    `probe` is a padded batch (input_ids, attention_mask) of at least two rows: the export traces it,
    and the check runs it plus a smaller batch of shorter rows, so the dynamic axes are exercised.
    """
    if probe["input_ids"].shape[0] < 2:
        raise ValueError("the ONNX export needs a probe batch of >= 2 rows (a batch of 1 would fix the batch axis)")
    require_export_extra()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    wrapper = LogitsOnly(model).eval()
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    # It warns once per torchvision op it cannot register; convobot exports no torchvision ops.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        # The exporter's own chatter (axis renaming, pytree deprecations); its failures still raise.
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        torch.onnx.export(wrapper, tuple(probe[name] for name in INPUTS), str(path), input_names=list(INPUTS),
                          output_names=["logits"], opset_version=opset, dynamo=True, verbose=False,
                          dynamic_shapes={name: {0: batch, 1: sequence} for name in INPUTS})
    longest = int(probe["attention_mask"].sum(1).argmax())
    half = max(2, int(probe["attention_mask"][longest].sum()) // 2)
    checked = [probe, {name: probe[name][longest:longest + 1, :half] for name in INPUTS}]
    diff = max(onnx_vs_torch(path, wrapper.model, inputs, tolerance) for inputs in checked)
    return {"file": path.name, "max_abs_logit_diff": diff, "tolerance": tolerance,
            "checked_shapes": [list(inputs["input_ids"].shape) for inputs in checked]}


def require_export_extra() -> None:
    """onnx, onnxscript (the dynamo exporter) and onnxruntime (the parity check) are an optional extra."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(f"ONNX export needs {', '.join(missing)}: pip install 'convobot[export]'")


def onnx_vs_torch(path: Path, model, inputs: dict[str, torch.Tensor], tolerance: float) -> float:
    """Max |onnxruntime - PyTorch| logit difference at real (non-padding) tokens; raises above `tolerance`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {name: inputs[name].numpy() for name in INPUTS})
    onnx_logits = torch.from_numpy(logits)[inputs["attention_mask"].bool()]
    difference = (checks.real_token_logits(model, inputs) - onnx_logits).abs().max().item()
    return checks.check_within(difference, tolerance,
                                f"onnxruntime ({path.name}) vs PyTorch, shape {list(inputs['input_ids'].shape)}")


EXAMPLES = (("Give three tips for staying healthy.", ""), ("Reverse the order of the words.", "apple bird cat"))


def example_batch(tokenizer) -> dict[str, torch.Tensor]:
    """Two Alpaca prompts of different lengths, padded: the export's trace inputs."""
    prompts = tokenizer([format_prompt(*example) for example in EXAMPLES], add_special_tokens=False)["input_ids"]
    return perplexity.pad(prompts, tokenizer.pad_token_id)


def export(cfg: ExportConfig, console: Console | None = None) -> dict:
    """Export a bundle to ONNX with a parity check; written atomically."""
    console = console or Console()
    require_export_extra()
    folder = Path(cfg.model)
    if not (folder / "config.json").is_file():
        raise ModelPathError(f"{folder} is not a merged model folder (no config.json); "
                             "export the bundle convobot merge writes, not a run dir or an adapter")
    model, tokenizer = load_model(folder, cfg.verify_checksums)
    output_dir = Path(cfg.output_dir) if cfg.output_dir else folder / "onnx"
    with atomic.directory(output_dir, overwrite=cfg.overwrite) as tmp:
        result = export_onnx(model, tmp, example_batch(tokenizer), cfg.tolerance, cfg.opset)
    bundle.add_export(folder, output_dir, result)
    console.print(f"{output_dir / result['file']}: onnxruntime matches PyTorch to max |logit diff| "
                  f"{result['max_abs_logit_diff']:.2e} (tolerance {cfg.tolerance:g}) on shapes {result['checked_shapes']}")
    return result


@hydra.main(config_path=str(COMMANDS_CONF_DIR), config_name="export", version_base="1.3")
def main(raw) -> None:
    """Hydra entry point: `convobot export-onnx model=<bundle> [output_dir=...] [overwrite=true]`."""
    run_command("convobot-export-onnx", ExportConfig, export, raw)


if __name__ == "__main__":
    main()
