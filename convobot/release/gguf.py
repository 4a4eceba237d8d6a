"""Export a merged bundle to GGUF for llama.cpp and Ollama, with llama.cpp's own converter, checked through
llama.cpp before a file is kept.

Examples:
    convobot export-gguf model=release/convobot-gpt2-alpaca                 # adds gguf/model-{f32,f16}.gguf
    convobot export-gguf model=outputs/demo/release types=[f16,q8_0]
    convobot export-gguf model=outputs/demo/release converter=~/llama.cpp/convert_hf_to_gguf.py

    <bundle>/gguf/
      model-f32.gguf, model-f16.gguf   the weights, tokenizer, chat template and EOS, for llama.cpp
      Modelfile                        for `ollama create <name> -f Modelfile`: the template and the stop token

The converter is llama.cpp's convert_hf_to_gguf.py from the llama-cpp-python release installed (its sdist
vendors it; pip fetches the sdist once into ~/.cache/convobot), so the converter and the runtime that checks its
output are one llama.cpp version. Each file is loaded with llama_cpp.Llama and must give the tokenizer's token ids
for held-out rows and a few hard strings, PyTorch's logits within `tolerance[type]`, the same greedy tokens for
`greedy_tokens` steps (or up to a near-tie: two tokens PyTorch scores within twice the tolerance, which the file's
logit error can swap), and stop at EOS where PyTorch does; a file that fails is not kept.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from rich.console import Console

from convobot import atomic
from convobot.cli import run_command
from convobot.config import COMMANDS_CONF_DIR, GGUFConfig
from convobot.errors import ConfigError, MissingExtraError, ModelPathError, OutputExistsError, VerificationError
from convobot.model.base import context_length
from convobot.release.onnx_export import EXAMPLES
from convobot.runs import bundle
from convobot.runs.loading import load_model, run_behind
from convobot.runs.rundir import HELDOUT
from convobot.scoring import perplexity
from convobot.template import PREAMBLE_NO_INPUT, format_example

TYPES = ("f32", "f16", "q8_0")
# Not weights or tokenizer: the converter does not read them, the GGUF folder is written beside them.
NOT_CONVERTED = {bundle.CARD, bundle.CHECKSUMS, bundle.REPORT}
# Text a tokenizer port gets wrong first: runs of spaces and newlines, accents, CJK, emoji, digits, EOS in text.
HARD_STRINGS = ("Hello world", "  two  spaces,\n\nnew lines\tand tabs ", "naïve café — 東京 🙂",
                "1234567 + 89 = 1234656", "end of turn<|endoftext|>next")


def gguf_name(kind: str) -> str:
    return f"model-{kind}.gguf"


def gguf_path(folder: Path, kind: str) -> Path:
    """Where export-gguf writes a bundle's file of type `kind` by default."""
    return Path(folder) / "gguf" / gguf_name(kind)


def require_gguf_extra() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise MissingExtraError("GGUF export needs llama-cpp-python (it checks the file): pip install "
                                "'convobot[gguf]' (builds llama.cpp from source, ~6 min on 2 cores, once)")


# ----------------------------------------------------------------------------- the converter

def llama_model_params():
    """llama.cpp's default model parameters, less its extra weight buffers where llama.cpp was built with AMX: the
    AMX kernels, which it picks for q8_0 weights, crash in llama_decode (llama-cpp-python 0.3.36 on a Xeon with
    AMX, tiny and GPT-2 small shapes alike). f32 and f16 weights never use them."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
        params.use_extra_bufts = False
    return params


@contextmanager
def llama_class():
    """llama_cpp.Llama, which takes no model parameters of its own, building its model with llama_model_params()
    (it reads llama.cpp's defaults from its own module at load time)."""
    import llama_cpp
    import llama_cpp.llama

    bindings = llama_cpp.llama.llama_cpp
    default = bindings.llama_model_default_params
    bindings.llama_model_default_params = llama_model_params
    try:
        yield llama_cpp.Llama
    finally:
        bindings.llama_model_default_params = default


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "convobot"


def converter_dir(path: str | None) -> Path:
    """The folder of convert_hf_to_gguf.py (with conversion/ and gguf-py/ beside it): `path`'s, or the one the
    installed llama-cpp-python release vendors, fetched with pip once and cached."""
    if path:
        script = Path(path).expanduser()
        folder = script.parent if script.name == "convert_hf_to_gguf.py" else script
        if not (folder / "convert_hf_to_gguf.py").is_file() or not (folder / "gguf-py").is_dir():
            raise ConfigError(f"config key 'converter': {folder} holds no convert_hf_to_gguf.py with gguf-py/ beside "
                              "it (a llama.cpp checkout)")
        return folder
    version = importlib.metadata.version("llama-cpp-python")
    folder = cache_dir() / f"llama.cpp-{version}"
    if not (folder / "convert_hf_to_gguf.py").is_file():
        fetch_converter(version, folder)
    return folder


def fetch_converter(version: str, folder: Path) -> None:
    """Unpack convert_hf_to_gguf.py, conversion/ and gguf-py/ from the llama-cpp-python sdist (pip download)."""
    with tempfile.TemporaryDirectory() as download:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                                 ":all:", "-d", download, f"llama-cpp-python=={version}"],
                                capture_output=True, text=True)
        archives = list(Path(download).glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise MissingExtraError(f"could not fetch llama.cpp's converter (the llama-cpp-python {version} sdist): "
                                    f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no sdist'}"
                                    "; pass converter=<llama.cpp checkout>/convert_hf_to_gguf.py")
        vendored = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        with atomic.directory(folder, overwrite=True) as tmp, tarfile.open(archives[0]) as sdist:
            for member in sdist.getmembers():
                name = member.name[len(vendored):] if member.name.startswith(vendored) else ""
                if name.startswith(wanted) and (member.isfile() or member.isdir()):
                    member.name = name
                    sdist.extract(member, tmp, filter="data")


def stage(folder: Path, tmp: Path) -> Path:
    """The bundle as the converter reads it: its model and tokenizer files (linked), config.json with `n_ctx`
    (llama.cpp's GPT-2 converter reads the context from it; transformers 5 no longer writes it)."""
    staged = tmp / "hf"
    staged.mkdir()
    for path in folder.iterdir():
        if path.is_file() and path.name not in NOT_CONVERTED and path.name != "config.json":
            (staged / path.name).symlink_to(path.resolve())
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("n_ctx", context_length(config))
    (staged / "config.json").write_text(json.dumps(config, indent=2))
    return staged


def convert(converter: Path, staged: Path, out: Path, kind: str) -> None:
    result = subprocess.run([sys.executable, "-m", "convobot.release.llama_convert", str(converter), str(staged),
                             "--outfile", str(out), "--outtype", kind], capture_output=True, text=True)
    if result.returncode != 0 or not out.is_file():
        tail = "\n".join(result.stderr.strip().splitlines()[-3:])
        raise VerificationError(f"llama.cpp's converter failed for {kind}: {tail}")


# ----------------------------------------------------------------------------- the checks

@dataclass
class Reference:
    """PyTorch's side of the checks, computed once for every file checked against it: held-out rows as text
    (prompt, answer, EOS), their ids and logits, and each row's prompt with PyTorch's greedy continuation."""
    texts: list[str]
    ids: list[list[int]]
    logits: list[np.ndarray]
    prompts: list[list[int]]
    greedy: list[list[int]]
    steps: int


@torch.no_grad()
def reference(model, tokenizer, examples, rows: int, steps: int) -> Reference:
    context = context_length(model.config)
    encoded = perplexity.encode_examples(examples.select(range(min(rows, len(examples)))), tokenizer, context)
    texts = [tokenizer.decode(row["input_ids"]) for row in encoded]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"][:context] for text in texts]
    logits = [model(torch.tensor([row])).logits[0].float().numpy() for row in ids]
    prompts = []
    for row in encoded:
        where = row["scored_from"]["response"]
        first = where if isinstance(where, int) else (where[-1][0] if where else len(row["input_ids"]))
        prompts.append(row["input_ids"][:first][-(context - steps):])  # room for the greedy steps
    greedy = [greedy_torch(model, prompt, steps, tokenizer.eos_token_id) for prompt in prompts]
    return Reference(texts, ids, logits, prompts, greedy, steps)


def greedy_torch(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    output = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=steps, do_sample=False, repetition_penalty=1.0, eos_token_id=eos,
                            pad_token_id=eos)
    return output[0, len(prompt):].tolist()


def greedy_llama(llm, prompt: list[int], steps: int, eos: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    tokens: list[int] = []
    while len(tokens) < steps:
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if tokens[-1] == eos:
            break
        llm.eval(tokens[-1:])
    return tokens


def first_difference(model, prompt: list[int], expected: list[int], got: list[int], margin: float,
                     name: str) -> int | None:
    """Where llama.cpp's greedy tokens first differ from PyTorch's, if they do at a near-tie: PyTorch scores the two
    tokens within `margin` (what the file's logit error can flip). A difference anywhere else is an error."""
    for step, (want, have) in enumerate(zip(expected, got)):
        if want == have:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt + expected[:step]])).logits[0, -1].float()
        gap = float(logits[want] - logits[have])
        if gap > margin:
            raise VerificationError(f"{name}: greedy token {step + 1} is {have} in llama.cpp, {want} in PyTorch, which "
                                    f"scores it {gap:.3g} higher (more than the {margin:g} the file's logit error "
                                    "can explain)")
        return step
    if len(got) != len(expected):  # one stopped at EOS or the step limit earlier: the other's next token differs
        raise VerificationError(f"{name}: greedy answer has {len(got)} tokens in llama.cpp, {len(expected)} in PyTorch")
    return None


def verify_gguf(path: Path, model, tokenizer, expected: Reference, tolerance: float) -> dict:
    """Load `path` with llama.cpp and compare it with the PyTorch model: ids, logits, greedy tokens, EOS."""
    import llama_cpp

    context = context_length(model.config)
    # An f32 KV cache (llama.cpp's default is f16): the check is of the file's weights, not of the cache's precision.
    with llama_class() as Llama:
        llm = Llama(str(path), n_ctx=context, logits_all=True, verbose=False, n_threads=os.cpu_count(),
                    type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        eos = tokenizer.eos_token_id
        if llm.token_eos() != eos:
            raise VerificationError(f"{path.name}: EOS is token {llm.token_eos()} in llama.cpp, {eos} in the tokenizer")
        for text in [*HARD_STRINGS, *expected.texts]:
            ours = tokenizer(text, add_special_tokens=False)["input_ids"]
            theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if ours != theirs:
                raise VerificationError(f"{path.name}: llama.cpp tokenizes {text[:60]!r} as {theirs[:12]}..., the "
                                        f"tokenizer as {ours[:12]}...")
        difference = 0.0
        for ids, logits in zip(expected.ids, expected.logits):
            llm.reset()
            llm.eval(ids)
            difference = max(difference, float(np.abs(np.asarray(llm.scores[:len(ids)]) - logits).max()))
        if not difference <= tolerance:
            raise VerificationError(f"{path.name}: llama.cpp's logits differ from PyTorch's by {difference:.3g} > "
                                    f"tolerance {tolerance:g} (config key 'tolerance.{path.stem.split('-')[-1]}')")
        stopped = near_ties = 0
        steps = expected.steps
        for prompt, greedy in zip(expected.prompts, expected.greedy):
            got = greedy_llama(llm, prompt, steps, eos)
            diverged = first_difference(model, prompt, greedy, got, 2 * tolerance, path.name)
            near_ties += diverged is not None
            if diverged is None and greedy and greedy[-1] == eos:  # llama.cpp's own loop must stop there too
                completion = llm.create_completion(prompt, max_tokens=2 * steps, temperature=0.0, repeat_penalty=1.0)
                if completion["choices"][0]["finish_reason"] != "stop":
                    raise VerificationError(f"{path.name}: llama.cpp did not stop at EOS")
                stopped += 1
        return {"file": path.name, "bytes": path.stat().st_size, "max_abs_logit_diff": difference,
                "tolerance": tolerance, "texts_tokenized_equal": len(HARD_STRINGS) + len(expected.texts),
                "greedy_rows": len(expected.prompts), "greedy_tokens": steps, "greedy_near_ties": near_ties,
                "stopped_at_eos": stopped}
    finally:
        llm.close()


# ----------------------------------------------------------------------------- Ollama

def modelfile(gguf_name: str, generation, context: int) -> str:
    """An Ollama Modelfile: the chat template's format in Ollama's Go template, EOS as the stop token."""
    template = (
        '{{- if .System }}{{ .System }}\n\n{{ else }}' + PREAMBLE_NO_INPUT + '{{ end }}'
        '{{- range .Messages }}'
        '{{- if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
        '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}<|endoftext|>\n\n'
        '{{ end }}{{- end }}### Response:\n'
    )
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""', 'PARAMETER stop "<|endoftext|>"',
             f"PARAMETER num_ctx {context}"]
    if generation.do_sample:
        lines += [f"PARAMETER temperature {generation.temperature}", f"PARAMETER top_p {generation.top_p}"]
    else:
        lines.append("PARAMETER temperature 0")
    lines.append(f"PARAMETER repeat_penalty {generation.repetition_penalty or 1.0}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the command

def held_out_examples(folder: Path, tokenizer):
    """The bundle's run's held-out rows, or two Alpaca prompts when the run is gone."""
    from datasets import Dataset

    try:
        run = run_behind(folder)
    except ModelPathError:
        run = None
    if run is not None and (run.path / HELDOUT).is_file():
        return run.heldout_pairs()
    return Dataset.from_list([format_example({"instruction": i, "input": x, "output": ""}) for i, x in EXAMPLES])


def export_gguf(cfg: GGUFConfig, console: Console | None = None) -> dict:
    """Convert, check and keep each requested type; written atomically, recorded in the bundle."""
    console = console or Console()
    require_gguf_extra()
    unknown = sorted(set(cfg.types) - set(TYPES))
    if unknown or not cfg.types:
        raise ConfigError(f"config key 'types': {unknown or 'none given'}; choose from {list(TYPES)}")
    folder = Path(cfg.model)
    if not bundle.is_model_folder(folder):
        raise ModelPathError(f"{folder} is not a merged model folder (config.json + model.safetensors); export the "
                             "bundle convobot merge writes")
    output_dir = Path(cfg.output_dir) if cfg.output_dir else folder / "gguf"
    there = [gguf_name(kind) for kind in cfg.types if (output_dir / gguf_name(kind)).is_file()]
    if there and not cfg.overwrite:
        raise OutputExistsError(f"{output_dir / there[0]} already exists (pass overwrite=true to replace it; other "
                                "types are added beside the files there)")
    model, tokenizer = load_model(folder, cfg.verify_checksums)
    model.eval()
    converter = converter_dir(cfg.converter)
    expected = reference(model, tokenizer, held_out_examples(folder, tokenizer), cfg.check_rows, cfg.greedy_tokens)
    results = {}
    with atomic.files_into(output_dir) as tmp, tempfile.TemporaryDirectory() as work:
        staged = stage(folder, Path(work))
        for kind in cfg.types:
            path = tmp / gguf_name(kind)
            convert(converter, staged, path, kind)
            results[kind] = verify_gguf(path, model, tokenizer, expected, cfg.tolerance.get(kind, 0.0))
            console.print(f"{kind}: {path.name} ({results[kind]['bytes'] / 2**20:.1f} MiB) matches PyTorch: max "
                          f"|logit diff| {results[kind]['max_abs_logit_diff']:.2e} (tolerance "
                          f"{results[kind]['tolerance']:g}), greedy tokens equal on {len(expected.prompts)} rows"
                          + (f" ({results[kind]['greedy_near_ties']} up to a near-tie)"
                             if results[kind]["greedy_near_ties"] else ""))
        kinds = [kind for kind in TYPES if kind in results or (output_dir / gguf_name(kind)).is_file()]
        ollama_file = gguf_name("f16" if "f16" in kinds else kinds[0])
        atomic.write_text(tmp / "Modelfile", modelfile(ollama_file, model.generation_config,
                                                       context_length(model.config)))
    recorded = (bundle.read_report(folder) or {}).get(output_dir.name, {}).get("types", {}) \
        if output_dir.resolve().parent == folder.resolve() else {}
    result = {"types": {kind: check for kind, check in (recorded | results).items() if kind in kinds},
              "modelfile": "Modelfile", "converter": str(converter),
              "llama_cpp_python": importlib.metadata.version("llama-cpp-python")}
    bundle.add_export(folder, output_dir, result, written=[*map(gguf_name, results), "Modelfile"])
    console.print(f"{output_dir}: {', '.join(r['file'] for r in results.values())} and a Modelfile "
                  f"(ollama create <name> -f {output_dir / 'Modelfile'})")
    return result


@hydra.main(config_path=str(COMMANDS_CONF_DIR), config_name="gguf", version_base="1.3")
def main(raw) -> None:
    """Hydra entry point: `convobot export-gguf model=<bundle> [types=[f32,f16,q8_0]] [output_dir=...]`."""
    run_command("convobot-export-gguf", GGUFConfig, export_gguf, raw)


if __name__ == "__main__":
    main()
