"""The release bundle's format: the merged model's save_pretrained folder plus what makes it a release, and the
checksums that say it is the folder that was verified (convobot/release/ writes it).

    <bundle>/
      config.json, generation_config.json, model.safetensors, tokenizer files   (AutoModelForCausalLM loads it)
      chat_template.jinja the chat template: the training prompt from chat messages (pipelines, servers)
      README.md           model card: what it is, how it was trained and scored, a usage snippet that runs
      merge_report.json   the merge checks, base vs merged perplexity, versions; the run it came from
      SHA256SUMS          every file's hash (`sha256sum -c SHA256SUMS` inside the bundle)
      onnx/               model.onnx (+ .data), when exported
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from convobot import atomic
from convobot.errors import VerificationError

log = logging.getLogger(__name__)

CHECKSUMS = "SHA256SUMS"
REPORT = "merge_report.json"
CARD = "README.md"


def is_model_folder(folder: Path) -> bool:
    """A save_pretrained folder with safetensors weights: a bundle, or a full fine-tune's model/."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and ((folder / "model.safetensors").is_file()
                                                   or (folder / "model.safetensors.index.json").is_file())


def read_report(folder: Path) -> dict | None:
    path = Path(folder) / REPORT
    return json.loads(path.read_text()) if path.is_file() else None


def recorded_run_dir(folder: Path) -> Path | None:
    """The run dir a bundle was merged from, as its merge_report.json recorded it (it may since be gone)."""
    report = read_report(folder)
    return Path(report["run_dir"]) if report else None


def verify(folder: Path, enabled: bool = True) -> None:
    """Refuse a bundle whose files differ from its SHA256SUMS, naming them (a folder without one has nothing to
    check against). `enabled=False` skips the check, with a warning."""
    if not (Path(folder) / CHECKSUMS).is_file():
        return
    if not enabled:
        log.warning("verify_checksums=false: %s is used without checking its %s", folder, CHECKSUMS)
        return
    problems = checksum_mismatches(folder)
    if problems:
        raise VerificationError(f"{folder} does not match its {CHECKSUMS}: {'; '.join(problems[:5])} (a file was "
                                "changed or damaged; verify_checksums=false uses it anyway)")


def add_export(folder: Path, export_dir: Path, result: dict, written: list[str] | None = None) -> None:
    """Record an export written into the bundle (`export_dir`, a folder directly inside it; one written elsewhere is
    not the bundle's) in merge_report.json and hash its files: only if the rest of the bundle still matches its
    SHA256SUMS (a bundle that does not verify is never re-signed). `written`: the files of `export_dir` this export
    wrote, when others there were kept (and must still match); none given, the whole folder is new."""
    folder, name = Path(folder), Path(export_dir).name
    if Path(export_dir).resolve().parent != folder.resolve():
        return
    signed = (folder / CHECKSUMS).is_file()
    if signed:
        new = {f"{name}/{file}" for file in written} if written is not None else None
        problems = [p for p in checksum_mismatches(folder)
                    if not (p.split(":", 1)[0] in new if new is not None else p.startswith(f"{name}/"))]
        if problems:
            log.warning("%s does not match its %s (%s): not recording the export in it", folder, CHECKSUMS,
                        "; ".join(problems[:3]))
            return
    report = read_report(folder)
    if report is not None:
        atomic.write_json(folder / REPORT, report | {name: result})
    if signed:
        write_checksums(folder)


def write_checksums(folder: Path) -> None:
    """SHA256SUMS in `sha256sum` format (check with `sha256sum -c SHA256SUMS` inside the folder)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{sha256_of(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    atomic.write_text(Path(folder) / CHECKSUMS, "".join(lines))


def checksum_mismatches(folder: Path) -> list[str]:
    """Files whose SHA-256 differs from SHA256SUMS, or that it lists but are missing, or it does not list."""
    folder = Path(folder)
    listed, problems = {}, []
    for number, line in enumerate((folder / CHECKSUMS).read_text(errors="replace").splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            problems.append(f"{CHECKSUMS} line {number}: not '<sha256>  <file>'")
        listed[name] = digest
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS}
    problems += [f"{name}: missing" for name in sorted(listed.keys() - present) if name]
    problems += [f"{name}: not in {CHECKSUMS}" for name in sorted(present - listed.keys())]
    problems += [f"{name}: checksum differs" for name in sorted(present & listed.keys())
                 if sha256_of(folder / name) != listed[name]]
    return problems


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
