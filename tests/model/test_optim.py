import pytest
import torch

from convobot.model.optim import FALLBACK, bnb_8bit_runs_on, describe_optimizer, resolve_optimizer


def test_bitsandbytes_8bit_adamw_runs_on_this_cpu():
    """bitsandbytes >= 0.45 ships a CPU backend; if this fails, the fallback test below covers it."""
    problem = bnb_8bit_runs_on(torch.device("cpu"))
    if problem is not None:
        pytest.skip(f"bitsandbytes 8-bit AdamW unavailable here: {problem}")
    import bitsandbytes as bnb

    param = torch.nn.Parameter(torch.randn(128, 128))
    optimizer = bnb.optim.AdamW8bit([param], lr=1e-2)
    before = param.detach().clone()
    param.grad = torch.ones_like(param)
    optimizer.step()
    assert optimizer.state[param]["state1"].dtype == torch.uint8
    assert not torch.equal(before, param.detach())  # it really stepped
    assert "state uint8" in describe_optimizer(optimizer)


def test_non_bnb_optimizer_passes_through():
    choice = resolve_optimizer("adamw_torch", torch.device("cpu"))
    assert choice.name == "adamw_torch" and choice.fallback_reason is None


def test_fallback_is_loud_and_recorded(monkeypatch):
    monkeypatch.setattr("convobot.model.optim.bnb_8bit_runs_on", lambda device: "simulated: no backend")
    with pytest.warns(RuntimeWarning, match="FALLING BACK"):
        choice = resolve_optimizer("adamw_bnb_8bit", torch.device("cpu"))
    assert choice.name == FALLBACK and choice.fallback_reason == "simulated: no backend"


@pytest.mark.parametrize("device, expected", [("cpu", "adamw_torch_fused"), ("cuda", "adamw_bnb_8bit")])
def test_auto_picks_by_device(monkeypatch, device, expected):
    monkeypatch.setattr("convobot.model.optim.bnb_8bit_runs_on", lambda device: None)  # no GPU needed to decide
    choice = resolve_optimizer("auto", torch.device(device))
    assert (choice.requested, choice.name, choice.fallback_reason) == ("auto", expected, None)


def test_auto_on_cuda_without_bitsandbytes_falls_back_loudly(monkeypatch):
    monkeypatch.setattr("convobot.model.optim.bnb_8bit_runs_on", lambda device: "simulated: no backend")
    with pytest.warns(RuntimeWarning, match="'adamw_bnb_8bit' unavailable"):
        choice = resolve_optimizer("auto", torch.device("cuda"))
    assert choice.name == FALLBACK and choice.requested == "auto"


def test_the_bitsandbytes_list_is_what_transformers_steps_with_bitsandbytes():
    """BNB_OPTIMIZERS are exactly the transformers optim names whose optimizer class is bitsandbytes' (torchao's
    adamw_torch_4bit is not one)."""
    from transformers import Trainer, TrainingArguments
    from transformers.training_args import OptimizerNames

    from convobot.model.optim import BNB_OPTIMIZERS

    def steps_with(name: str) -> str:
        try:
            cls, _ = Trainer.get_optimizer_cls_and_kwargs(TrainingArguments(output_dir="unused", optim=name,
                                                                             use_cpu=True))
        except (ImportError, ValueError, RuntimeError):  # needs a package or a device this machine lacks
            return "unavailable"
        return cls.__module__

    bitsandbytes = {name.value for name in OptimizerNames if steps_with(name.value).startswith("bitsandbytes")}
    assert BNB_OPTIMIZERS == bitsandbytes
    assert "adamw_torch_4bit" not in BNB_OPTIMIZERS
