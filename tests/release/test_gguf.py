"""GGUF export through llama.cpp's own converter, checked by llama.cpp itself; and read back the way llama.cpp /
Ollama users would: the GGUF's chat template, its EOS, the Modelfile."""

import io
import shutil

import pytest
from rich.console import Console

from convobot.config import ChatConfig, GenerationOptions, GGUFConfig
from convobot.errors import ConfigError, OutputExistsError, VerificationError
from convobot.release.gguf import export_gguf, held_out_examples, reference, verify_gguf
from convobot.runs.bundle import checksum_mismatches, read_report
from convobot.runs.loading import load_base, load_model
from convobot.runs.rundir import open_run
from convobot.serving.chat import chat
from convobot.template import CHAT_TEMPLATE

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the 'gguf' extra (make test installs it)")
QUIET = {"console": Console(file=io.StringIO())}
QUESTION = ("Reverse the order of the words.", "apple bird cat")


@pytest.fixture(scope="module")
def exported(smoke_gguf):
    return smoke_gguf.bundle, smoke_gguf.result


def test_the_config_composes_with_the_cli_defaults(compose_command):
    cfg = compose_command("gguf", "model=m", "types=[q8_0]")
    assert cfg.types == ["q8_0"] and cfg.tolerance["f32"] == 2e-2 and cfg.converter is None


def test_every_type_is_written_checked_and_signed(exported):
    bundle, result = exported
    assert sorted(p.name for p in (bundle / "gguf").iterdir()) == ["Modelfile", "model-f16.gguf", "model-f32.gguf",
                                                                    "model-q8_0.gguf"]
    for kind, check in result["types"].items():
        assert check["max_abs_logit_diff"] <= check["tolerance"] and check["greedy_rows"] > 0, kind
        assert check["texts_tokenized_equal"] >= 5
    sizes = {kind: check["bytes"] for kind, check in result["types"].items()}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]
    assert checksum_mismatches(bundle) == [] and read_report(bundle)["gguf"]["types"].keys() == {"f32", "f16", "q8_0"}


def test_llama_cpp_chats_through_the_gguf_chat_template_as_convobot_chat_does(exported):
    bundle, _ = exported
    llm = llama_cpp.Llama(str(bundle / "gguf" / "model-f32.gguf"), n_ctx=256, verbose=False)
    try:
        assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
        model, tokenizer = load_model(bundle)
        assert llm.token_eos() == tokenizer.eos_token_id
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": QUESTION[0], "input": QUESTION[1]}],
                                           temperature=0.0, repeat_penalty=1.0, max_tokens=24)
    finally:
        llm.close()
    expected = chat(ChatConfig(model=str(bundle), prompt=QUESTION[0], input=QUESTION[1], generation=GenerationOptions(
        max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)), out=io.StringIO())
    assert reply["choices"][0]["message"]["content"] == expected


def test_the_modelfile_names_the_file_the_template_and_the_stop_token(exported):
    bundle, _ = exported
    text = (bundle / "gguf" / "Modelfile").read_text()
    assert text.startswith("FROM ./model-f16.gguf\n") and (bundle / "gguf" / "model-f16.gguf").is_file()
    assert 'PARAMETER stop "<|endoftext|>"' in text and "PARAMETER num_ctx 256" in text
    assert "### Instruction:\n{{ .Content }}" in text and text.count('"""') == 2


def test_the_check_fails_on_a_file_that_is_not_the_model(exported, smoke_release):
    """The base model's weights are not the bundle's: its logits must not pass for the bundle's GGUF."""
    bundle, _ = exported
    run = open_run(smoke_release.run_dir)
    _, tokenizer = load_model(bundle)
    base = load_base(run).eval()
    expected = reference(base, tokenizer, held_out_examples(bundle, tokenizer), rows=2, steps=8)
    with pytest.raises(VerificationError, match="logits differ from PyTorch's|greedy tokens differ"):
        verify_gguf(bundle / "gguf" / "model-f32.gguf", base, tokenizer, expected, 2e-2)


def test_bad_requests_are_refused_before_any_file_is_written(smoke_release, tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'types': \['q4'\]"):
        export_gguf(GGUFConfig(model=str(smoke_release.release), types=["q4"], output_dir=str(tmp_path / "g")), **QUIET)
    with pytest.raises(ConfigError, match="config key 'converter'"):
        export_gguf(GGUFConfig(model=str(smoke_release.release), converter=str(tmp_path),
                               output_dir=str(tmp_path / "g")), **QUIET)
    assert not (tmp_path / "g").exists()


def test_a_greedy_difference_passes_only_at_a_near_tie(smoke_release):
    import torch

    from convobot.release.gguf import first_difference

    model, tokenizer = load_model(smoke_release.release)
    prompt = tokenizer("### Instruction:\nAdd.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    best, runner_up = torch.topk(logits, 2).indices.tolist()
    worst = int(logits.argmin())
    gap = float(logits[best] - logits[runner_up])
    assert first_difference(model, prompt, [best], [best], 0.0, "f") is None
    assert first_difference(model, prompt, [best], [runner_up], gap + 1e-6, "f") == 0
    with pytest.raises(VerificationError, match="greedy token 1 is"):
        first_difference(model, prompt, [best], [worst], gap + 1e-6, "f")


def test_types_are_added_beside_those_there_and_only_replaced_when_asked(smoke_release, tmp_path):
    bundle = shutil.copytree(smoke_release.release, tmp_path / "bundle")
    quick = {"check_rows": 1, "greedy_tokens": 4}
    export_gguf(GGUFConfig(model=str(bundle), types=["q8_0"], **quick), **QUIET)
    export_gguf(GGUFConfig(model=str(bundle), types=["f32"], **quick), **QUIET)
    assert sorted(p.name for p in (bundle / "gguf").iterdir()) == ["Modelfile", "model-f32.gguf", "model-q8_0.gguf"]
    assert read_report(bundle)["gguf"]["types"].keys() == {"f32", "q8_0"} and checksum_mismatches(bundle) == []
    assert (bundle / "gguf" / "Modelfile").read_text().startswith("FROM ./model-f32.gguf")
    with pytest.raises(OutputExistsError, match="model-q8_0.gguf already exists"):
        export_gguf(GGUFConfig(model=str(bundle), types=["q8_0"], **quick), **QUIET)
    kept = (bundle / "gguf" / "model-f32.gguf")
    kept.write_bytes(kept.read_bytes()[:-1] + b"\0")  # a file already there, damaged: the bundle is not re-signed
    export_gguf(GGUFConfig(model=str(bundle), types=["q8_0"], overwrite=True, verify_checksums=False, **quick), **QUIET)
    assert checksum_mismatches(bundle) == ["gguf/model-f32.gguf: checksum differs"]
