"""Loading a model from whatever a user points at: a merged bundle or model folder, a run dir, or a run's adapter/.
Weights load as safetensors only, never with remote code; a bundle is checked against its SHA256SUMS first."""

from __future__ import annotations

from pathlib import Path

from convobot.config import ModelSource, PeftMethod
from convobot.errors import ModelPathError
from convobot.runs import bundle
from convobot.runs.rundir import BASE_MODEL, CONFIG, RunDir, open_run


def run_behind(path: str | Path) -> RunDir | None:
    """The run a model path comes from: a run dir, a run's adapter/, or a bundle whose run is still there."""
    path = Path(path)
    if not path.exists():
        raise ModelPathError(f"model path {path} does not exist")
    if (path / "adapter_config.json").is_file():
        path = path.parent
    if (path / CONFIG).is_file():
        return open_run(path)
    recorded = bundle.recorded_run_dir(path)
    return open_run(recorded) if recorded is not None and recorded.is_dir() else None


# Pickled weights: loading one runs whatever code it carries, so convobot refuses them.
PICKLED = ("pytorch_model.bin", "adapter_model.bin", "pytorch_model.bin.index.json")


def require_safetensors(folder: Path, weights: str) -> Path:
    """`folder`/`weights` (a .safetensors file), readable; one line naming the file otherwise."""
    from safetensors import safe_open

    path = Path(folder) / weights
    if not path.is_file() and not path.with_name(f"{path.stem}.safetensors.index.json").is_file():
        pickled = [name for name in PICKLED if (Path(folder) / name).is_file()]
        if pickled:
            raise ModelPathError(f"{Path(folder) / pickled[0]} is pickled weights; convobot loads safetensors only "
                                 f"({weights})")
        raise ModelPathError(f"{path} is missing")
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt"):  # reads the header: a cut-off file fails here
                pass
        except Exception as err:  # safetensors raises its own SafetensorError, or OSError
            raise ModelPathError(f"{path}: not a readable safetensors file ({err})") from err
    return path


def load_folder(folder: Path):
    """A save_pretrained folder in fp32: safetensors only, never remote code."""
    import torch
    from transformers import AutoModelForCausalLM

    require_safetensors(folder, "model.safetensors")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=False).eval()


def load_base(run: RunDir):
    """The run's base model in fp32: the base the run saved (bundled or random init) or the hub model at its
    revision; for a QLoRA run, with the 4-bit values it trained on, dequantised."""
    import torch

    from convobot.model.base import load_base_model
    from convobot.model.quantize import round_trip_4bit
    from convobot.model.tokenizer import load_tokenizer

    if run.config.model.source != ModelSource.hub:
        folder = run.path / BASE_MODEL
        if not folder.is_dir():
            raise ModelPathError(f"{folder} is missing: the run's base ({run.config.model.source.value}) is kept "
                                 "there")
        base = load_folder(folder)
    else:
        tokenizer = load_tokenizer(str(run.weights_dir))
        base = load_base_model(run.config.model, tokenizer, torch.float32).eval()
    if run.config.peft.quantization:
        round_trip_4bit(base, run.config.peft)
    return base


def load_trained(run: RunDir, base=None):
    """The trained model as training left it: the base with its (unmerged) adapter, or the full model."""
    if run.method == PeftMethod.full:
        return load_folder(run.weights_dir)
    from peft import PeftModel

    require_safetensors(run.weights_dir, "adapter_model.safetensors")
    return PeftModel.from_pretrained(base if base is not None else load_base(run), run.weights_dir,
                                     is_trainable=False, use_safetensors=True).eval()


def load_model(path: str | Path, verify_checksums: bool = True):
    """(model, tokenizer) for chat and eval from a merged bundle / model folder, a run dir, or its adapter/.
    A bundle is checked against its SHA256SUMS first (`verify_checksums=False` skips that, with a warning)."""
    from convobot.model.tokenizer import load_tokenizer

    path = Path(path)
    if not path.exists():
        raise ModelPathError(f"model path {path} does not exist")
    if bundle.is_model_folder(path) or (path / "config.json").is_file() and not (path / CONFIG).is_file():
        bundle.verify(path, verify_checksums)
        return load_folder(path), load_tokenizer(str(path))
    if (path / "adapter_config.json").is_file():
        path = path.parent  # an adapter/ folder: its run dir knows the base
    if (path / CONFIG).is_file():
        run = open_run(path)
        return load_trained(run), load_tokenizer(str(run.weights_dir))
    raise ModelPathError(
        f"{path} is not a model: expected a merged bundle (config.json + model.safetensors), "
        "a convobot run dir (config.yaml + adapter/ or model/), or a run's adapter/ folder")
