"""Merging a smoke run into a release bundle, and each merge check failing when it should.

The shared LoRA smoke run and its bundle (`smoke_release`) come from conftest.py.
"""

import io
import os
import re
import shutil
import stat
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from convobot.cli import run_command
from convobot.config import MergeConfig
from convobot.errors import ModelPathError, VerificationError
from convobot.release.card import push_to_hub
from convobot.release.merge import check_fp32, merge
from convobot.runs.bundle import CHECKSUMS, REPORT, checksum_mismatches
from convobot.runs.loading import load_model
from convobot.runs.rundir import open_run

BUNDLE_FILES = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "chat_template.jinja", "README.md", REPORT, CHECKSUMS}


def test_merge_config_composes_with_the_cli_defaults(compose_command):
    cfg = compose_command("merge", "run_dir=r", "output_dir=o", "generation.temperature=0")
    assert isinstance(cfg, MergeConfig) and cfg.run_dir == "r" and not cfg.overwrite and cfg.tolerance == 1e-4
    assert cfg.generation.temperature == 0 and cfg.push_to_hub is None


def test_bundle_is_complete_and_its_checksums_match(smoke_release, tmp_path):
    release = smoke_release.release
    files = {p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file()}
    assert files == BUNDLE_FILES
    assert not list(release.parent.glob(".*.tmp"))  # the temp dir was renamed, nothing left behind
    assert checksum_mismatches(release) == []
    tampered = shutil.copytree(release, tmp_path / "copy")
    (tampered / "config.json").write_text((tampered / "config.json").read_text() + " ")
    assert checksum_mismatches(tampered) == ["config.json: checksum differs"]


def test_report_records_every_check(smoke_release):
    check = smoke_release.report["verification"]
    assert check["adapter_vs_merged_max_abs_logit_diff"] <= 1e-4
    assert check["reloaded_vs_merged_max_abs_logit_diff"] <= 1e-4
    assert check["base_vs_merged_max_abs_logit_diff"] > 1e-3  # the adapter really changes the model
    # LoRA on c_attn, c_proj, c_fc matches 4 Conv1D weights per block; the tiny model has 2 blocks.
    assert check["weights_changed"]["tensors_changed"] == 8
    ppl = smoke_release.report["perplexity"]
    assert ppl["base"]["full"]["tokens"] == ppl["merged"]["full"]["tokens"] > ppl["merged"]["response"]["tokens"] > 0
    assert ppl["merged"]["response"]["perplexity"] != ppl["base"]["response"]["perplexity"]


def test_generation_config_pads_with_eos(smoke_release):
    model, tokenizer = load_model(smoke_release.release)
    generation = model.generation_config
    assert generation.pad_token_id == generation.eos_token_id == tokenizer.eos_token_id
    assert generation.max_new_tokens == 128


def test_reloaded_bundle_gives_the_adapter_models_logits(smoke_release):
    """Independent of merge's own checks: peft adapter on the saved base vs the bundle, reloaded."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(smoke_release.run_dir / "base_model", use_safetensors=True)
    adapter = PeftModel.from_pretrained(base, smoke_release.run_dir / "adapter").eval()
    bundle = AutoModelForCausalLM.from_pretrained(smoke_release.release, use_safetensors=True).eval()
    ids = torch.randint(1, 500, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (adapter(input_ids=ids).logits - bundle(input_ids=ids).logits).abs().max() < 1e-4


def test_model_card_describes_the_release_and_its_snippet_runs(smoke_release):
    card = (smoke_release.release / "README.md").read_text()
    for fact in ("license: apache-2.0", "tiny-gpt2", "bundled", "### Response:", '"lora_r": 8',
                 "32,768", "| merged |", "convobot chat model="):
        assert fact in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f"model={str(smoke_release.release)!r}" in snippet and "messages = [{'role': 'user'" in snippet
    with redirect_stdout(io.StringIO()):
        exec(compile(snippet, "README.md", "exec"), {})  # noqa: S102 - runs the card's own usage example


def test_a_zeroed_adapter_is_refused(smoke_release, tmp_path, quiet_merge):
    run_dir = shutil.copytree(smoke_release.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    save_file({name: torch.zeros_like(t) for name, t in load_file(weights).items()}, weights)
    with pytest.raises(VerificationError, match="changed nothing"):
        quiet_merge(run_dir=str(run_dir), output_dir=str(tmp_path / "out"), perplexity=False)
    assert not (tmp_path / "out").exists()


def test_a_tampered_merge_is_caught_by_logit_parity(smoke_release, tmp_path, monkeypatch, quiet_merge):
    from peft.tuners.tuners_utils import BaseTuner  # where LoRA's merge_and_unload lives

    honest_merge = BaseTuner.merge_and_unload

    def tampered_merge(self, *args, **kwargs):
        merged = honest_merge(self, *args, **kwargs)
        merged.transformer.h[0].mlp.c_fc.weight.data[0, 0] += 0.5
        return merged

    monkeypatch.setattr(BaseTuner, "merge_and_unload", tampered_merge)
    with pytest.raises(VerificationError, match=r"\(a\) adapter model vs merged model.*> tolerance"):
        quiet_merge(run_dir=str(smoke_release.run_dir), output_dir=str(tmp_path / "out"), perplexity=False)
    assert not (tmp_path / "out").exists()


def test_a_corrupted_save_is_caught_by_reload_parity(smoke_release, tmp_path, monkeypatch, quiet_merge):
    honest_save = GPT2LMHeadModel.save_pretrained

    def corrupting_save(self, folder, *args, **kwargs):
        honest_save(self, folder, *args, **kwargs)
        weights = load_file(Path(folder) / "model.safetensors")
        weights["transformer.h.1.attn.c_attn.weight"][0, :] += 0.5
        save_file(weights, Path(folder) / "model.safetensors", metadata={"format": "pt"})

    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", corrupting_save)
    with pytest.raises(VerificationError, match=r"\(c\) merged model vs the saved model.safetensors"):
        quiet_merge(run_dir=str(smoke_release.run_dir), output_dir=str(tmp_path / "out"), perplexity=False)
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temp folder


def test_overwrite_only_when_asked(smoke_release, tmp_path, quiet_merge):
    earlier = shutil.copytree(smoke_release.release, tmp_path / "bundle")
    (earlier / "stale.txt").write_text("from an earlier release")
    options = {"run_dir": str(smoke_release.run_dir), "output_dir": str(earlier), "perplexity": False}
    with pytest.raises(FileExistsError, match="overwrite=true"):
        quiet_merge(**options)
    assert (earlier / "stale.txt").is_file()
    quiet_merge(**options, overwrite=True)
    assert {p.name for p in earlier.iterdir()} == BUNDLE_FILES and checksum_mismatches(earlier) == []


def test_a_full_fine_tune_gives_the_same_bundle(tmp_path, quiet_merge, train_smoke):
    run_dir = train_smoke(tmp_path / "full", "peft=full")
    report = quiet_merge(run_dir=str(run_dir), output_dir=str(tmp_path / "release"), perplexity=False)
    files = {p.name for p in (tmp_path / "release").iterdir()}
    assert files == BUNDLE_FILES and report["method"] == "full"
    assert report["verification"]["adapter_vs_merged_max_abs_logit_diff"] == 0.0  # already merged
    assert report["verification"]["weights_changed"]["tensors_changed"] > 8  # every weight trains
    assert "full-fine-tune" in (tmp_path / "release" / "README.md").read_text()


def test_only_an_fp32_base_is_merged_into(smoke_release):
    model, _ = load_model(smoke_release.release)
    check_fp32(model)
    with pytest.raises(VerificationError, match="non-fp32"):
        check_fp32(model.half())


def test_push_to_hub_uploads_the_folder(monkeypatch, tmp_path):
    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs["folder_path"]))

    monkeypatch.setattr("huggingface_hub.HfApi", RecordingApi)
    push_to_hub(tmp_path, "someone/convobot-tiny")
    assert calls == [("create_repo", "someone/convobot-tiny", {"private": True, "exist_ok": True}),
                     ("upload_folder", "someone/convobot-tiny", str(tmp_path))]


def test_bad_paths_give_clear_errors(smoke_release, tmp_path):
    with pytest.raises(ModelPathError, match="does not exist"):
        open_run(tmp_path / "missing")
    with pytest.raises(ModelPathError, match="config.yaml is missing"):
        open_run(tmp_path)
    with pytest.raises(ModelPathError, match="is not a model"):
        load_model(tmp_path)
    no_adapter = shutil.copytree(smoke_release.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("adapter"))
    with pytest.raises(ModelPathError, match="adapter is missing"):
        open_run(no_adapter)
    raw = OmegaConf.structured(MergeConfig(run_dir=str(tmp_path / "missing"), output_dir=str(tmp_path / "o")))
    with pytest.raises(SystemExit, match="convobot-merge: ModelPathError: run dir .*missing does not exist"):
        run_command("convobot-merge", MergeConfig, merge, raw)
    with pytest.raises(SystemExit, match="output_dir=... is required"):
        run_command("convobot-merge", MergeConfig, merge, OmegaConf.create({"run_dir": "r"}))


def test_a_hub_style_base_loads_by_name(smoke_release, tmp_path, quiet_merge):
    """source=hub takes the base by name and revision (a hub id, or here a local folder, offline)."""
    run_dir = shutil.copytree(smoke_release.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    base = shutil.move(run_dir / "base_model", tmp_path / "elsewhere")
    config = OmegaConf.load(run_dir / "config.yaml")
    config.model.source, config.model.name, config.model.license = "hub", str(base), None
    OmegaConf.save(config, run_dir / "config.yaml")
    report = quiet_merge(run_dir=str(run_dir), output_dir=str(tmp_path / "out"), perplexity=False)
    assert report["base_model"] == str(base)
    assert report["verification"]["weights_changed"]["tensors_changed"] == 8
    assert "license: other" in (tmp_path / "out" / "README.md").read_text()  # unknown base: no licence guessed


def test_pickled_or_damaged_adapter_weights_are_refused(smoke_release, tmp_path, quiet_merge):
    run_dir = shutil.copytree(smoke_release.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    torch.save(load_file(weights), run_dir / "adapter" / "adapter_model.bin")  # a pickle, as older tools save
    weights.unlink()
    with pytest.raises(ModelPathError, match=r"adapter_model.bin is pickled weights; convobot loads safetensors only"):
        quiet_merge(run_dir=str(run_dir), output_dir=str(tmp_path / "out"), perplexity=False)
    with pytest.raises(ModelPathError, match="pickled weights"):
        load_model(run_dir)
    (run_dir / "adapter" / "adapter_model.bin").unlink()
    weights.write_bytes((smoke_release.run_dir / "adapter" / "adapter_model.safetensors").read_bytes()[:50])
    with pytest.raises(ModelPathError, match="adapter_model.safetensors: not a readable safetensors file"):
        load_model(run_dir)
    assert not (tmp_path / "out").exists()


def test_bundle_files_are_readable_by_all(smoke_release):
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in smoke_release.release.iterdir()}
    assert set(modes.values()) == {0o666 & ~current_umask()}, modes


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


KILL_WHILE_WRITING_THE_BUNDLE = """
import os, signal, sys
from convobot.runs import bundle
from convobot.config import MergeConfig
from convobot.release.merge import merge

bundle.write_checksums = lambda folder: os.kill(os.getpid(), signal.SIGKILL)  # the bundle's last file
merge(MergeConfig(run_dir=sys.argv[1], output_dir=sys.argv[2], perplexity=False))
"""


def test_a_killed_merge_leaves_nothing_the_next_merge_does_not_clean_up(smoke_release, tmp_path, quiet_merge):
    import signal
    import subprocess
    import sys

    out = tmp_path / "release"
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_WRITING_THE_BUNDLE, str(smoke_release.run_dir),
                             str(out)], capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (left,) = tmp_path.glob(".release.*.tmp")  # the whole model, half-released: never renamed into place
    assert (left / "model.safetensors").is_file() and not out.exists()
    quiet_merge(run_dir=str(smoke_release.run_dir), output_dir=str(out), perplexity=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"] and checksum_mismatches(out) == []
