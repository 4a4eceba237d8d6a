"""The plain loss head (convobot/loss_head.py) answers TRL's fused-head call exactly as TRL's chunked head does:
same loss, per-token log-probs, entropy, top-1 flags and gradients, on padded, packed and unlabelled batches."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from trl.trainer.utils import add_fused_lm_head

from convobot.config import LossHead, PeftConfig
from convobot.model import loss_head
from convobot.model.adapters import apply_peft
from convobot.model.tokenizer import load_tokenizer

VOCAB = 211
OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer asks its head for


def tiny_gpt2(lora: bool):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=VOCAB, attn_pdrop=0.0,
                        resid_pdrop=0.0, embd_pdrop=0.0)
    base = GPT2LMHeadModel(config)
    add_fused_lm_head(base, outputs=OUTPUTS)
    model = apply_peft(base, PeftConfig(r=4)) if lora else base
    if lora:  # LoRA B starts at zero; make the adapters matter so their gradients are compared meaningfully
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
    return model.train(), base


def batches():
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12))
    padded_labels = ids.clone()
    padded_labels[0, :4] = -100  # a prompt
    padded_labels[1, 9:] = -100  # padding
    padded = {"input_ids": ids, "attention_mask": (padded_labels != -100).long() | (torch.arange(12) < 9),
              "labels": padded_labels}
    packed_labels = ids[:1].clone()
    packed_labels[0, [0, 1, 6, 7]] = -100  # two rows, each with a two-token prompt
    packed = {"input_ids": ids[:1], "labels": packed_labels,
              "position_ids": torch.cat([torch.arange(6), torch.arange(6)])[None]}
    return {"padded": padded, "packed": packed}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("shape", ["padded", "packed"])
@pytest.mark.parametrize("num_items_in_batch", [None, 37])
def test_plain_head_matches_trl_chunked_head(lora, shape, num_items_in_batch):
    chunked, _ = tiny_gpt2(lora)
    plain, plain_base = copy.deepcopy(chunked), None
    plain_base = plain.get_base_model() if lora else plain
    loss_head.use_plain_head(plain_base)
    batch = batches()[shape]
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}

    results = {}
    for name, model in (("chunked", chunked), ("plain", plain)):
        out = model(**batch, fused_lm_head=True, **kwargs)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[name] = (out, grads)
    (ref, ref_grads), (got, got_grads) = results["chunked"], results["plain"]

    assert torch.equal(got.label_mask, ref.label_mask)
    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    for field in ("log_probs", "entropy"):
        assert torch.allclose(getattr(got, field), getattr(ref, field), atol=1e-5), field
    assert torch.equal(got.is_top1, ref.is_top1)
    assert (got.log_probs[~got.label_mask] == 0).all()  # TRL's convention: zero where there is no label
    assert ref_grads.keys() == got_grads.keys() and ref_grads
    for name in ref_grads:
        assert torch.allclose(got_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6), name


def test_a_micro_batch_without_labels_gives_a_differentiable_zero():
    """A packed step can hold a micro-batch whose labels are all prompt: the loss is 0 and backward still runs."""
    model, base = tiny_gpt2(lora=True)
    loss_head.use_plain_head(base)
    batch = batches()["padded"]
    out = model(**{**batch, "labels": torch.full_like(batch["labels"], -100)}, fused_lm_head=True)
    assert out.loss.item() == 0.0 and not out.label_mask.any()
    out.loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)


def test_generation_and_plain_forward_are_unchanged():
    model, base = tiny_gpt2(lora=False)
    model.eval()
    ids = batches()["padded"]["input_ids"][:1, :5]
    with torch.no_grad():
        before_logits = model(ids).logits
        before = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        loss_head.use_plain_head(base)
        assert torch.equal(model(ids).logits, before_logits)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), before)


def test_refuses_a_model_without_trl_head():
    with pytest.raises(RuntimeError, match="no fused LM head"):
        loss_head.use_plain_head(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB)))


@pytest.mark.parametrize("head", list(LossHead))
def test_build_trainer_installs_the_configured_head(compose_train, tmp_path, head):
    from convobot.data.examples import prepare
    from convobot.training.recipe import build_trainer

    cfg = compose_train("experiment=smoke", "data.num_rows=40", "data.eval_size=4", f"hardware.loss_head={head.value}")
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    trainer, _ = build_trainer(cfg, tmp_path, torch.device("cpu"), cfg.hardware.precision, tokenizer,
                               prepare(cfg.data, tokenizer))
    code = trainer.model.get_base_model().forward.__func__.__code__  # functools.wraps copies the names, not this
    assert (code.co_filename == loss_head.__file__) == (head == LossHead.plain)
