"""The memory planner against real allocations of the tiny model on CPU, and its refusal.

Weights, gradients and optimizer states are read from a real `convobot.training.recipe.run` (its Trainer's
model and optimizer, right after an optimizer step); activations are the tensors autograd really
saves in a forward through TRL's loss head; the loss head's working memory comes from the profiler's
memory timeline. GPU numbers: benchmarks/plan_gpu_validation.py.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from convobot import plan
from convobot.config import LossHead, Precision
from convobot.errors import PlanError
from convobot.model import loss_head
from convobot.model.adapters import apply_peft
from convobot.model.base import load_base_model, prepare_for_training
from convobot.model.tokenizer import load_tokenizer
from convobot.plan import formulas
from convobot.training import recipe

REPO = Path(__file__).resolve().parents[2]
QUICK = ["experiment=smoke", "train.max_steps=2", "report.before=false", "report.samples=0",
         "report.exact_match_rows=0"]


class AllocationProbe(TrainerCallback):
    """After the first optimizer step (gradients still there, optimizer state just created)."""

    def __init__(self):
        self.measured = {}

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.measured:
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        states = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
        self.measured.update({
            "weights": formulas.storage_bytes([*model.parameters(), *model.buffers()]),
            "gradients": formulas.storage_bytes([p.grad for p in model.parameters() if p.grad is not None]),
            "optimizer states": formulas.storage_bytes(states),
            "optimizer": type(inner).__name__,
        })


@pytest.mark.parametrize("overrides", [["peft=lora", "optim=adamw_8bit"], ["peft=full", "optim=adamw_8bit"],
                                       ["peft=full", "optim=adamw_torch"], ["peft=full"]],
                         ids=["lora-8bit", "full-8bit", "full-adamw32", "full-auto"])
def test_parameter_gradient_optimizer_parts_match_a_real_run(compose_train, tmp_path, overrides):
    probe = AllocationProbe()
    cfg = compose_train(*QUICK, *overrides)
    results = recipe.run(cfg, tmp_path, callbacks=[probe])
    if results["optimizer_fallback_reason"]:
        pytest.skip(f"bitsandbytes fell back: {results['optimizer_fallback_reason']}")
    estimate = plan.estimate(cfg, "cpu")
    for part in ("weights", "gradients", "optimizer states"):
        measured, planned = probe.measured[part], estimate.parts[part].bytes
        assert abs(planned - measured) <= 0.10 * measured, (part, planned, measured)
    if "optim=adamw_8bit" in overrides:  # 8-bit states really were 8-bit, so the check above meant it
        assert "uint8" in results["optimizer"]


def saved_activation_bytes(cfg) -> int:
    """Bytes autograd keeps for backward after one training forward, as SFTTrainer runs it."""
    from trl.trainer.utils import add_fused_lm_head

    tokenizer = load_tokenizer(cfg.model.tokenizer)
    base = load_base_model(cfg.model, tokenizer)
    prepare_for_training(base, cfg.model)
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))
    model = apply_peft(base, cfg.peft).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    ids = torch.randint(0, len(tokenizer), (cfg.hardware.batch_size, cfg.data.max_length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, fused_lm_head=True)
    return sum(saved.values())


@pytest.mark.parametrize("overrides", [
    ["peft=lora"], ["peft=full"], ["model=tiny_random", "peft=lora", "model.attn_implementation=eager", "model.n_layer=4"],
    ["peft=lora", "model.dropout=0.1", "peft.dropout=0.05"], ["peft=full", "model.dropout=null"],
    ["peft=lora", "peft.target_modules=[c_proj,c_fc]", "peft.r=32"], ["peft=full", "data.max_length=64"],
])
def test_activation_part_matches_tensors_saved_for_backward(compose_train, overrides):
    cfg = compose_train("experiment=smoke", "hardware.batch_size=4", "data.max_length=96", *overrides)
    measured = saved_activation_bytes(cfg)
    planned = plan.estimate(cfg, "cpu").parts["activations"].bytes
    assert abs(planned - measured) <= 0.10 * measured, (planned, measured)


@pytest.mark.filterwarnings("ignore:.*export_memory_timeline.*:FutureWarning")  # still the CPU memory timeline
@pytest.mark.parametrize("head", list(LossHead))
def test_loss_head_matches_the_profiler_memory_timeline(tmp_path, head):
    """TRL's chunked log-prob head or convobot's plain one, forward + backward, at a shape other than the one
    their constants came from."""
    from torch.profiler import ProfilerActivity, profile
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    tokens, hidden_size, vocab = 600, 32, 2000
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    lm_head = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(False)  # frozen (LoRA)
    targets = torch.randint(0, vocab, (tokens,))

    def step():
        if head == LossHead.plain:
            log_probs, *_ = loss_head.score_labelled(hidden, lm_head, targets)
        else:
            log_probs, *_ = ChunkedLogProbFunction.apply(hidden, lm_head.weight, None, targets, 1.0,
                                                         formulas.TRL_VOCAB_TILE, None, 1.0,
                                                         ("log_probs", "entropy", "is_top1"))
        (-log_probs.sum()).backward()

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    prof.export_memory_timeline(str(tmp_path / "timeline.json"), device="cpu")
    _, sizes = json.loads((tmp_path / "timeline.json").read_text())
    measured = max(sum(by_category) for by_category in sizes)
    arch = formulas.Architecture("gpt2", 1, hidden_size, 1, 4 * hidden_size, vocab, tokens, 0.0, 0.0, 0.0)
    planned = formulas.loss_head_bytes(arch, 1, tokens, "cpu", autocast=False, head=head)
    assert abs(planned - measured) <= 0.10 * measured, (planned, measured)


def gpt2(compose_train, *overrides):
    return compose_train("experiment=seed_repro", "hardware=rtx3050_4gb", *overrides)


@pytest.mark.parametrize("hardware", ["rtx3050_4gb", "rtx4090_24gb"])
@pytest.mark.parametrize("experiment", ["seed_repro", "lora_4gb"])
def test_hardware_profiles_fit_gpt2_small_with_margin(compose_train, hardware, experiment):
    cfg = compose_train(f"experiment={experiment}", f"hardware={hardware}")
    estimate = plan.estimate(cfg, "cuda")
    assert estimate.parts["weights"].bytes > 120e6 * 2  # really GPT-2 small (124M params), not the tiny model
    assert estimate.total <= 0.97 * estimate.budget, plan.refusal(estimate, cfg)


def test_planner_refuses_over_budget_naming_the_dominant_part(compose_train):
    cfg = gpt2(compose_train, "hardware.gradient_checkpointing=false", "model.attn_implementation=eager",
               "hardware.batch_size=8")
    with pytest.raises(PlanError) as refused:
        plan.check_fits(cfg, "cuda", Precision.fp16)
    message = str(refused.value)
    assert "exceeds hardware.vram_gb=4.0 GiB" in message
    assert "The largest part is activations" in message
    assert "hardware.gradient_checkpointing=true  ->" in message  # a change, with the peak it would give
    assert "(fits)" in message.split("Together:")[1]  # and a set of changes that fits
    assert "hardware.allow_over_budget=true" in message


def test_each_remedy_lowers_the_plan(compose_train):
    cfg = gpt2(compose_train, "hardware.gradient_checkpointing=false", "hardware.eval_batch_size=8",
               "optim=adamw_torch")
    before = plan.estimate(cfg, "cuda")
    for part in ("activations", "eval logits", "optimizer states"):
        options = plan.remedies(cfg, part)
        assert options, part
        for changes, changed in options:
            after = plan.estimate(changed, "cuda")
            assert after.parts[part].bytes < before.parts[part].bytes, (part, changes)


def test_allow_over_budget_trains_anyway(compose_train, caplog):
    cfg = gpt2(compose_train, "hardware.eval_tokens=262144", "hardware.allow_over_budget=true")
    estimate = plan.check_fits(cfg, "cuda", Precision.fp16)
    assert not estimate.fits and "training anyway" in caplog.text


def test_cuda_training_run_is_refused_before_loading_anything(compose_train, monkeypatch, tmp_path):
    """train.run plans first on CUDA: pretend the device is a GPU; the refusal comes before any download."""
    monkeypatch.setattr(recipe, "resolve_device", lambda *args, **kwargs: torch.device("cuda"))
    cfg = gpt2(compose_train, "hardware.eval_tokens=262144")
    with pytest.raises(PlanError, match="largest part is eval logits"):
        recipe.run(cfg, tmp_path)


def test_lora_under_fp16_plans_a_half_precision_frozen_base(compose_train):
    lora, full = plan.estimate(gpt2(compose_train, "peft=lora"), "cuda"), plan.estimate(gpt2(compose_train), "cuda")
    assert lora.parts["weights"].bytes == pytest.approx(full.parts["weights"].bytes / 2, rel=0.02)
    assert lora.parts["gradients"].bytes < 0.02 * full.parts["gradients"].bytes


def test_paged_optimizer_states_are_listed_but_not_counted(compose_train):
    paged = plan.estimate(gpt2(compose_train, "optim=paged_adamw_8bit"), "cuda")
    plain = plan.estimate(gpt2(compose_train), "cuda")
    assert paged.parts["optimizer states"].bytes == plain.parts["optimizer states"].bytes > 0
    assert paged.allocated == plain.allocated - plain.parts["optimizer states"].bytes
    assert any("paged" in note for note in paged.notes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the benchmark would run")
def test_gpu_validation_script_skips_clearly_without_cuda(capsys):
    import runpy

    script = runpy.run_path(str(REPO / "benchmarks" / "plan_gpu_validation.py"))
    assert script["main"]([]) == 0
    assert capsys.readouterr().out.startswith("SKIP: no CUDA device visible")


def test_packed_runs_plan_micro_batches_of_one_sequence(compose_train):
    """Packed, a step accumulates batch_size micro-batches of one sequence (recipe.build_sft_config)."""
    packed = plan.estimate(gpt2(compose_train, "train.packing=true", "hardware.batch_size=4"), "cuda")
    single = plan.estimate(gpt2(compose_train, "hardware.batch_size=1"), "cuda")
    padded = plan.estimate(gpt2(compose_train, "hardware.batch_size=4"), "cuda")
    for part in ("activations", "loss head"):
        assert packed.parts[part].bytes == single.parts[part].bytes < padded.parts[part].bytes, part


def test_preference_stages_plan_both_answers_and_a_reference_copy_only_for_full(compose_train):
    """DPO's forward holds each pair's chosen and rejected answers; its reference is free with an adapter (the base,
    adapter disabled) and a whole frozen copy with peft=full, unless precomputed."""
    sft = gpt2(compose_train, "peft=lora", "hardware.batch_size=4")
    pairs = ["stage=dpo", "data=bundled_preferences", f"data.max_length={sft.data.max_length}", "hardware.batch_size=2"]
    lora_dpo = plan.estimate(gpt2(compose_train, "peft=lora", *pairs), "cuda")
    assert lora_dpo.parts["activations"].bytes == plan.estimate(sft, "cuda").parts["activations"].bytes
    assert lora_dpo.parts["reference model"].bytes == 0 and "adapter disabled" in lora_dpo.parts["reference model"].detail
    full_dpo = plan.estimate(gpt2(compose_train, "peft=full", *pairs), "cuda")
    assert full_dpo.parts["reference model"].bytes == full_dpo.parts["weights"].bytes > 120e6 * 2
    assert full_dpo.phases["end of forward (loss head)"] >= full_dpo.parts["reference model"].bytes * 2
    precomputed = plan.estimate(gpt2(compose_train, "peft=full", *pairs, "stage.precompute_ref_log_probs=true"),
                                "cuda")
    assert precomputed.parts["reference model"].bytes == 0
    grpo = plan.estimate(gpt2(compose_train, "peft=full", "stage=grpo", "stage.beta=0", "stage.num_generations=2"),
                         "cuda")
    assert grpo.parts["reference model"].bytes == 0
