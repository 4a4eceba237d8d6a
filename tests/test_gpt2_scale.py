"""The pipeline at the shape users run: GPT-2 small's architecture (GPT2Config(), random init) with the real GPT-2
tokenizer and real alpaca-gpt4 rows from ../shared, loaded through the hub code path (model.name=DIR), as the Hub
model would be: 2 packed LoRA steps -> merge -> eval (perplexity and answers) -> ONNX export -> one chat answer ->
q8_0 GGUF export checked by llama.cpp, when llama-cpp-python is installed (~2 min on 2 cores)."""

import importlib.util
import io
import math

import pytest
import torch
from rich.console import Console

from convobot.config import (
    ChatConfig,
    EvalConfig,
    ExportConfig,
    GenerationOptions,
    GGUFConfig,
    SlidingConfig,
    compose,
    validate,
)
from convobot.release.gguf import export_gguf
from convobot.release.onnx_export import export
from convobot.scoring.evaluate import evaluate
from convobot.serving.chat import chat
from convobot.training.recipe import run

QUIET = {"console": Console(file=io.StringIO())}


@pytest.fixture(scope="module")
def gpt2_small(shared_data, tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    folder = tmp_path_factory.mktemp("gpt2-small")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(shared_data / "gpt2-tokenizer"))
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_train_merge_eval_export_chat_at_gpt2_small_shape(gpt2_small, shared_data, tmp_path, quiet_merge):
    cfg = validate(compose([
        "experiment=lora_4gb", "hardware=cpu", f"model.name={gpt2_small}", f"model.tokenizer={gpt2_small}",
        "data=local", f"data.path={shared_data / 'alpaca_gpt4' / 'train_sample.jsonl'}", "data.eval_size=8",
        "train.max_steps=2", "hardware.batch_size=2", "report.samples=0", "report.before=false",
    ]))
    assert cfg.train.packing and cfg.model.source.value == "hub"
    results = run(cfg, tmp_path / "run")
    assert results["steps"] == 2 and results["trainable_params"] < 0.02 * results["total_params"]
    assert results["total_params"] > 120e6 and math.isfinite(results["eval_loss"])

    release = tmp_path / "release"
    report = quiet_merge(run_dir=str(tmp_path / "run"), output_dir=str(release), verify_rows=4, perplexity_rows=4)
    check = report["verification"]
    assert check["adapter_vs_merged_max_abs_logit_diff"] <= 1e-4
    assert check["reloaded_vs_merged_max_abs_logit_diff"] <= 1e-4
    assert check["weights_changed"]["tensors_changed"] == 48  # c_attn, c_proj, c_fc, mlp.c_proj x 12 blocks

    scores = evaluate(EvalConfig(model=str(release), run_dir=str(tmp_path / "run"), compare=["adapter", "merged"],
                                 max_rows=4, sliding=SlidingConfig(window=256), generate=True, max_new_tokens=8),
                      **QUIET)
    assert scores["rows"] == 4 and scores["adapter_vs_merged"]["max_relative_difference"] <= 1e-4
    merged = scores["models"]["merged"]
    assert merged["max_length"] == cfg.data.max_length and merged["sliding"]["windows"] > 1
    assert merged["generation"]["rows"] == 4 and 0 <= merged["generation"]["chrf"] <= 100

    exported = export(ExportConfig(model=str(release)), **QUIET)
    assert exported["max_abs_logit_diff"] <= 1e-4

    out = io.StringIO()
    answer = chat(ChatConfig(model=str(release), prompt="Give three tips for staying healthy.",
                             generation=GenerationOptions(max_new_tokens=8, temperature=0.0)), out=out)
    assert isinstance(answer, str) and out.getvalue() == answer + "\n"

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python (the 'gguf' extra) is not installed: GGUF export not checked")
    gguf = export_gguf(GGUFConfig(model=str(release), types=["q8_0"], check_rows=2, greedy_tokens=8), **QUIET)
    for kind, check in gguf["types"].items():  # the real GPT-2 tokenizer, its full vocabulary and context
        assert check["max_abs_logit_diff"] <= check["tolerance"] and check["texts_tokenized_equal"] == 7, kind
