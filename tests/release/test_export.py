"""ONNX export of a merged bundle, checked against PyTorch with onnxruntime (one export, reused)."""

import copy
import io
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from convobot.config import ExportConfig
from convobot.errors import MissingExtraError, ModelPathError, VerificationError
from convobot.release.merge import ONNX_CHECK_ROWS
from convobot.release.onnx_export import export, onnx_vs_torch
from convobot.runs.bundle import CHECKSUMS, REPORT, checksum_mismatches
from convobot.runs.loading import load_model

onnxruntime = pytest.importorskip("onnxruntime")


def files_of(folder) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def bundle(smoke_release, tmp_path_factory):
    """A copy of the shared bundle (the export adds to it), with onnx/ added by convobot-export-onnx
    (the dynamo export takes 5-10 s: done once, reused by every test here)."""
    copy = shutil.copytree(smoke_release.release, tmp_path_factory.mktemp("export") / "bundle")
    result = export(ExportConfig(model=str(copy)), console=Console(file=io.StringIO()))
    return SimpleNamespace(path=copy, onnx=copy / "onnx" / result["file"], result=result)


def test_export_reports_parity_on_two_shapes(bundle):
    result = bundle.result
    assert result["max_abs_logit_diff"] <= result["tolerance"] == 1e-4
    (rows, length), (one, shorter) = result["checked_shapes"]
    assert rows >= 2 and one == 1 and shorter < length


def test_onnxruntime_matches_pytorch_on_new_shapes(bundle):
    """Independent of the export's own check: fresh inputs, batch and length it was not traced with."""
    model, _ = load_model(bundle.path)
    session = onnxruntime.InferenceSession(str(bundle.onnx), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    for batch, length in ((3, 7), (1, 90)):
        ids = torch.randint(1, 500, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        (logits,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits
        assert logits.shape == tuple(expected.shape)
        assert (torch.from_numpy(logits) - expected).abs().max() < 1e-4


def test_export_into_a_bundle_refreshes_its_report_and_checksums(bundle):
    assert json.loads((bundle.path / REPORT).read_text())["onnx"] == bundle.result
    listed = (bundle.path / CHECKSUMS).read_text()
    assert "  onnx/model.onnx\n" in listed and "  onnx/model.onnx.data\n" in listed
    assert checksum_mismatches(bundle.path) == []


def test_parity_check_catches_a_model_that_differs(bundle):
    model, _ = load_model(bundle.path)
    tampered = copy.deepcopy(model)
    # Row 0: input feature 0 into every q, k, v unit. (Shifting all weights by one constant would
    # cancel out: LayerNorm'd inputs sum to about 0.)
    tampered.transformer.h[0].attn.c_attn.weight.data[0, :] += 0.5
    inputs = {"input_ids": torch.randint(1, 500, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    assert onnx_vs_torch(bundle.onnx, model, inputs, 1e-4) <= 1e-4
    with pytest.raises(VerificationError, match=r"onnxruntime \(model.onnx\) vs PyTorch.*> tolerance"):
        onnx_vs_torch(bundle.onnx, tampered, inputs, 1e-4)


def test_export_refuses_overwrite_and_non_bundles(bundle, smoke_release, compose_command):
    assert compose_command("export", "model=m").output_dir is None
    quiet = Console(file=io.StringIO())
    with pytest.raises(FileExistsError, match="overwrite=true"):
        export(ExportConfig(model=str(bundle.path)), console=quiet)
    with pytest.raises(ModelPathError, match="not a merged model folder"):
        export(ExportConfig(model=str(smoke_release.run_dir)), console=quiet)


def test_merge_can_export_while_merging(smoke_release, tmp_path, quiet_merge):
    report = quiet_merge(run_dir=str(smoke_release.run_dir), output_dir=str(tmp_path / "bundle"), perplexity=False,
                         export_onnx=True)
    files = {p.relative_to(tmp_path / "bundle").as_posix() for p in (tmp_path / "bundle").rglob("*") if p.is_file()}
    assert files == files_of(smoke_release.release) | {"onnx/model.onnx", "onnx/model.onnx.data"}
    assert report["onnx"]["max_abs_logit_diff"] <= 1e-4 and report["onnx"]["checked_shapes"][0][0] == ONNX_CHECK_ROWS
    assert checksum_mismatches(tmp_path / "bundle") == []  # the sums were written after the export


def test_a_missing_extra_names_the_pip_install(smoke_release, tmp_path, monkeypatch, quiet_merge):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else
                        real_find_spec(name, *a))
    with pytest.raises(MissingExtraError, match=r"needs onnxscript: pip install 'convobot\[export\]'"):
        export(ExportConfig(model=str(smoke_release.release), output_dir=str(tmp_path / "onnx")))
    with pytest.raises(MissingExtraError, match="convobot\\[export\\]"):  # before any work
        quiet_merge(run_dir=str(smoke_release.run_dir), output_dir=str(tmp_path / "bundle"), export_onnx=True)
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "bundle").exists()



def test_a_tampered_bundle_is_not_exported_nor_re_signed(tampered_bundle):
    listed = (tampered_bundle / CHECKSUMS).read_text()
    with pytest.raises(VerificationError, match="model.safetensors: checksum differs"):
        export(ExportConfig(model=str(tampered_bundle)), console=Console(file=io.StringIO()))
    assert not (tampered_bundle / "onnx").exists()
    export(ExportConfig(model=str(tampered_bundle), verify_checksums=False), console=Console(file=io.StringIO()))
    assert (tampered_bundle / "onnx" / "model.onnx").is_file()
    assert (tampered_bundle / CHECKSUMS).read_text() == listed  # not re-signed: the damage still shows
    assert "model.safetensors: checksum differs" in checksum_mismatches(tampered_bundle)
