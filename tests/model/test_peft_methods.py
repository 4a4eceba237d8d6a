"""QLoRA (a 4-bit NF4 base through bitsandbytes, here on the CPU backend), DoRA and rsLoRA: each trains, merges
through the same three checks, and the planner knows what 4-bit weights cost."""

import pytest
import torch

from convobot.config import compose, validate
from convobot.model.quantize import load_quantized_base, round_trip_4bit
from convobot.plan import estimate
from convobot.runs.loading import load_base, load_model
from convobot.runs.rundir import open_run

bnb = pytest.importorskip("bitsandbytes")


def test_the_merge_base_holds_exactly_the_4bit_values_qlora_trained_on():
    cfg = validate(compose(["peft=qlora"]))
    quantized = load_quantized_base(cfg.model, cfg.peft, torch.float32, torch.device("cpu"))
    from transformers import AutoModelForCausalLM

    from convobot.model.base import BUNDLED_BASE_DIR

    base = AutoModelForCausalLM.from_pretrained(BUNDLED_BASE_DIR, use_safetensors=True)
    assert round_trip_4bit(base, cfg.peft) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj x 2 blocks
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            loaded = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            assert torch.equal(base.get_submodule(name).weight.T, loaded), name  # Conv1D holds it transposed


def test_qlora_trains_on_cpu_and_merges_into_what_it_trained(train_smoke, quiet_merge, tmp_path):
    from peft import PeftModel

    run_dir = train_smoke(tmp_path / "qlora", "peft=qlora")
    run = open_run(run_dir)
    results = run.metrics()
    assert results["peft"] == "qlora" and results["total_params"] == 527_872  # the weights, not their 4-bit bytes
    report = quiet_merge(run_dir=str(run_dir), output_dir=str(tmp_path / "release"))
    assert report["verification"]["weights_changed"]["tensors_changed"] > 0
    merged, _ = load_model(tmp_path / "release")
    # The adapter on the 4-bit base, as training ran it, against the merged fp32 bundle.
    quantized = load_quantized_base(run.config.model, run.config.peft, torch.float32, torch.device("cpu"))
    trained = PeftModel.from_pretrained(quantized, run_dir / "adapter").eval()
    ids = torch.randint(1, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (trained(input_ids=ids).logits - merged.eval()(input_ids=ids).logits).abs().max() < 1e-3
    # And the merge's base is that 4-bit base dequantised, not the original fp32 weights.
    merge_base, saved_base = load_base(run), load_model(run.path / "base_model")[0]
    assert not torch.equal(merge_base.transformer.h[0].attn.c_attn.weight, saved_base.transformer.h[0].attn.c_attn.weight)


@pytest.mark.parametrize("method", ["dora", "rslora"])
def test_dora_and_rslora_train_and_merge_through_the_checks(method, train_smoke, quiet_merge, tmp_path):
    run_dir = train_smoke(tmp_path / method, f"peft={method}")
    report = quiet_merge(run_dir=str(run_dir), output_dir=str(tmp_path / "release"))
    check = report["verification"]
    assert check["adapter_vs_merged_max_abs_logit_diff"] <= check["tolerance"]
    assert check["reloaded_vs_merged_max_abs_logit_diff"] <= check["tolerance"]


def test_peft_options_reach_peft(compose_train):
    from convobot.model.adapters import lora_config

    assert lora_config(compose_train("peft=dora").peft).use_dora
    rslora = compose_train("peft=rslora", "peft.r=16").peft
    assert lora_config(rslora).use_rslora and not lora_config(compose_train("peft=lora").peft).use_rslora


def test_the_planner_counts_4bit_weights_and_lets_gpt2_xl_fit_4gb(compose_train):
    lora = estimate(compose_train("experiment=lora_4gb", "model=gpt2-xl", "hardware=rtx3050_4gb"), device="cuda")
    qlora = estimate(compose_train("experiment=lora_4gb", "model=gpt2-xl", "hardware=rtx3050_4gb", "peft=qlora"),
                     device="cuda")
    assert not lora.fits and qlora.fits
    # 4-bit linear weights: a quarter of fp16's, plus their scales; the embeddings stay fp16.
    assert qlora.parts["weights"].bytes < 0.45 * lora.parts["weights"].bytes
    assert qlora.parts["dequantization buffer"].bytes == 1600 * 6400 * 2  # the largest matrix (c_fc), fp16
    no_double = estimate(compose_train("experiment=lora_4gb", "model=gpt2-xl", "hardware=rtx3050_4gb", "peft=qlora",
                                       "peft.double_quant=false"), device="cuda")
    assert no_double.parts["weights"].bytes > qlora.parts["weights"].bytes
