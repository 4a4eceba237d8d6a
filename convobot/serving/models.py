"""What a server serves: bundles, run dirs and adapters, grouped so that adapters of one base share one copy of it.

    models=[release/bot]                         a merged bundle: its own engine (llama.cpp or PyTorch)
    models=[outputs/lora-run, outputs/dora-run]  two adapters of one base: one engine, one copy of the base, and the
                                                 base itself served too, so the three decode in one batch
    models=[lora:outputs/lora-run/adapter]       `id:path` names a model; otherwise a bundle or run is called by its
                                                 folder's name, a run's adapter/ by its run's

A run's base is the one it trained on (its saved base_model/, or the Hub model at its revision; for QLoRA the exact
4-bit values, dequantised), so an adapter answers as `convobot chat` answers on its run. A plain peft adapter folder
(no run around it) names its base in adapter_config.json. Adapters whose bases are the same weights share a group;
adapters can join and leave a running group (load_lora_adapter / unload_lora_adapter).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from convobot.config import GenerationOptions, ModelSource, ServeConfig
from convobot.errors import ConfigError, ModelPathError
from convobot.model.base import context_length, resolve_device
from convobot.model.tokenizer import load_tokenizer
from convobot.runs import bundle
from convobot.runs.loading import load_base, load_folder, require_safetensors
from convobot.runs.rundir import BASE_MODEL, CONFIG, RunDir, open_run
from convobot.serving.engine import Engine
from convobot.serving.row_lora import BASE, use_row_lora

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "llama_cpp")


@dataclass
class Source:
    """A `models=` entry, resolved: what it is, where its weights are, and (adapters) which base it goes on."""
    spec: str
    model_id: str
    kind: str  # "bundle" (a merged release), "full" (a full fine-tune's model/) or "adapter"
    path: Path
    run: RunDir | None = None
    base_key: tuple | None = None  # adapters: the identity of the weights they go on
    base_id: str | None = None  # adapters: what the base itself is called
    base_ref: str | None = None  # a plain adapter folder's base_model_name_or_path

    @property
    def dora(self) -> bool:
        """DoRA rescales whole weights: peft batches it with no other adapter, so it decodes on a base of its own."""
        return self.kind == "adapter" and bool(json.loads((self.path / "adapter_config.json").read_text())
                                               .get("use_dora"))


def parse_spec(spec: str) -> tuple[str | None, str]:
    """`id:path` (or `id=path`, which Hydra's command line takes only quoted) or `path`."""
    match = re.fullmatch(r"([\w.-]+)[:=](.+)", spec.strip())
    return (match.group(1), match.group(2)) if match else (None, spec.strip())


def resolve(spec: str) -> Source:
    """A bundle, a run dir or an adapter folder; one line naming the path if it is none of those."""
    name, raw = parse_spec(spec)
    path = Path(raw).expanduser()
    if not path.exists():
        raise ModelPathError(f"model path {path} does not exist")
    if (path / "adapter_config.json").is_file() and (path.parent / CONFIG).is_file():
        path = path.parent  # a run's adapter/: its run knows the base
    if (path / CONFIG).is_file():
        run = open_run(path)
        model_id = name or path.resolve().name
        if not run.config.peft.adapter:
            return Source(spec, model_id, "full", run.weights_dir, run)
        return Source(spec, model_id, "adapter", run.weights_dir, run, run_base_key(run), run_base_id(run))
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ModelPathError(f"{path / 'adapter_config.json'} names no base_model_name_or_path")
        return Source(spec, name or path.resolve().name, "adapter", path, None, folder_base_key(base),
                      Path(base).resolve().name if Path(base).is_dir() else base, base)
    if bundle.is_model_folder(path):
        return Source(spec, name or path.resolve().name, "bundle", path)
    raise ModelPathError(f"{path} is not a model: expected a merged bundle (config.json + model.safetensors), a "
                         "convobot run dir (config.yaml + adapter/ or model/), or an adapter folder "
                         "(adapter_config.json)")


def run_base_key(run: RunDir) -> tuple:
    """Which weights a run's adapter goes on: its saved base's bytes, or the Hub model at its revision; a QLoRA
    base (its 4-bit values) is its own."""
    peft = run.config.peft
    quantized = (peft.quantization, peft.double_quant) if peft.quantization else None
    if run.config.model.source != ModelSource.hub:
        return ("weights", bundle.sha256_of(require_safetensors(run.path / BASE_MODEL, "model.safetensors")), quantized)
    return ("hub", run.config.model.name, run.config.model.revision, quantized)


def folder_base_key(base: str) -> tuple:
    folder = Path(base)
    if folder.is_dir():
        return ("weights", bundle.sha256_of(require_safetensors(folder, "model.safetensors")), None)
    return ("hub", base, None, None)


def run_base_id(run: RunDir) -> str:
    """What a run's base is called: its model config's name; a stage's (init_from) is the earlier run's model."""
    if run.config.model.source == ModelSource.run:
        return f"{Path(run.config.init_from).name}-merged"
    return run.config.model.name


@dataclass
class Group:
    """One engine: a full model, or a base with the adapters loaded on it."""
    engine: Engine
    tokenizer: object
    context: int
    defaults: GenerationOptions
    backend: str
    base_key: tuple | None = None
    base_id: str | None = None
    model: object = None  # the peft model the adapters are loaded into (adapter groups)
    adapters: dict[str, str] = field(default_factory=dict)  # model id -> peft adapter name
    removing: set[str] = field(default_factory=set)  # adapters unloading: no new requests
    next_adapter: int = 0

    def adapter_name(self, model_id: str) -> str:
        return self.adapters.get(model_id, BASE)


@dataclass
class Served:
    """What a model id resolves to."""
    model_id: str
    group: Group
    path: str
    parent: str | None  # an adapter's base model id
    created: int = field(default_factory=lambda: int(time.time()))


class Registry:
    """The served models by id, their groups, and adding and dropping adapters while serving."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.models: dict[str, Served] = {}
        self.groups: list[Group] = []
        self.lock = threading.Lock()
        self.adding = threading.Lock()
        self.device = resolve_device(cfg.device, key="device")

    def get(self, model_id: str | None) -> Served:
        from convobot.serving.api import RequestError

        with self.lock:
            if model_id is None and len(self.models) == 1:
                return next(iter(self.models.values()))
            served = self.models.get(model_id) if model_id is not None else None
            if served is None or model_id in served.group.removing:
                known = ", ".join(sorted(self.models))
                raise RequestError(f"the model {model_id!r} does not exist; this server serves: {known}"
                                   if model_id is not None else f"model is required: this server serves {known}",
                                   "model", status=404 if model_id is not None else 400, code="model_not_found")
            return served

    # ----------------------------------------------------------------- start-up

    def load(self, specs: list[str]) -> None:
        sources = [resolve(spec) for spec in specs]
        ids = [source.model_id for source in sources]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ConfigError(f"config key 'models': two models are called {duplicates[0]!r}: name them (id:path)")
        for source in sources:
            if source.kind == "adapter":
                self._add_adapter(source)
            else:
                self._add_full(source)

    def _group_for(self, key: tuple) -> Group | None:
        return next((group for group in self.groups if group.base_key == key), None)

    def _add_full(self, source: Source) -> None:
        backend = self._backend_for(source)
        if source.kind == "bundle":
            bundle.verify(source.path, self.cfg.verify_checksums)
        tokenizer = load_tokenizer(str(source.path))
        config = json.loads((source.path / "config.json").read_text())
        context = context_length(config)
        if backend == "llama_cpp":
            from convobot.serving.llama_runner import LlamaRunner

            runner = LlamaRunner(self._gguf(source.path), context, self.cfg.max_batch, self.cfg.threads)
        else:
            from convobot.serving.torch_runner import TorchRunner

            runner = TorchRunner(load_folder(source.path).to(self.device), self.cfg.max_batch, adapters=False)
        defaults = bundle_defaults(source.path) if source.kind == "bundle" else GenerationOptions()
        group = Group(self._engine(runner, tokenizer, source.model_id), tokenizer, context, defaults, backend)
        self.groups.append(group)
        self.models[source.model_id] = Served(source.model_id, group, str(source.path), None)
        log.info("serving %s (%s, %s)", source.model_id, source.kind, backend)

    def _add_adapter(self, source: Source) -> None:
        if self.cfg.backend == "llama_cpp":
            raise ConfigError(f"config key 'backend': llama_cpp serves merged bundles; {source.model_id} is an "
                              "adapter: use backend=torch (or auto), or merge it with convobot merge")
        group = None if source.dora else self._group_for(source.base_key)
        if group is None:
            group = self._new_adapter_group(source)
        else:
            group.engine.call(lambda: self._load_into(group, source))
        self.models[source.model_id] = Served(source.model_id, group, str(source.path), group.base_id)

    def _new_adapter_group(self, source: Source) -> Group:
        """A base with `source` on it, the base served too; a DoRA adapter gets a base of its own, not served."""
        from peft import PeftModel

        from convobot.serving.torch_runner import TorchRunner

        base = load_base(source.run) if source.run else base_model(source)
        base_id = source.base_id
        if base_id in self.models or any(group.base_id == base_id for group in self.groups if group.base_key):
            base_id = f"{base_id}@{source.base_key[1][:8]}"  # another base of the same name
        require_safetensors(source.path, "adapter_model.safetensors")
        model = PeftModel.from_pretrained(base.to(self.device), source.path, adapter_name="a0", is_trainable=False,
                                          use_safetensors=True).eval()
        tokenizer = load_tokenizer(tokenizer_folder(source))
        runner = TorchRunner(model, self.cfg.max_batch, adapters=not source.dora)
        group = Group(self._engine(runner, tokenizer, source.model_id if source.dora else base_id), tokenizer,
                      context_length(model.config), GenerationOptions(), "torch",
                      None if source.dora else source.base_key, source.base_id if source.dora else base_id, model,
                      {source.model_id: "a0"}, next_adapter=1)
        self.groups.append(group)
        if not source.dora:
            self.models[base_id] = Served(base_id, group, source.run.base_description if source.run else
                                          source.base_ref, None)
        return group

    def _load_into(self, group: Group, source: Source) -> None:
        """In the engine's thread: one more adapter on the group's model; a failure leaves the others as they were."""
        require_safetensors(source.path, "adapter_model.safetensors")
        name = f"a{group.next_adapter}"
        group.next_adapter += 1
        try:
            group.model.load_adapter(source.path, adapter_name=name, is_trainable=False, use_safetensors=True)
        except Exception as err:
            if name in group.model.peft_config:
                group.model.delete_adapter(name)
            raise ModelPathError(f"{source.path}: cannot be loaded as an adapter of {group.base_id} ({err})") from err
        group.model.eval()
        use_row_lora(group.model)  # the layers this adapter targets and the others did not
        group.adapters[source.model_id] = name

    def _engine(self, runner, tokenizer, name: str) -> Engine:
        return Engine(runner, tokenizer, name, self.cfg.max_queued, self.cfg.prefill_chunk).start()

    def _backend_for(self, source: Source) -> str:
        """torch or llama_cpp for a full model: auto takes llama.cpp for merged bundles on the CPU, where it is
        fastest, when its extra is installed."""
        backend = self.cfg.backend
        if backend not in BACKENDS:
            raise ConfigError(f"config key 'backend': {backend!r}; use one of {list(BACKENDS)}")
        llama_ok = source.kind == "bundle" and self.device.type == "cpu"
        if backend == "llama_cpp":
            if source.kind != "bundle":
                raise ConfigError(f"config key 'backend': llama_cpp serves merged bundles; {source.model_id} is a "
                                  "run's model: merge it with convobot merge, or use backend=torch")
            if importlib.util.find_spec("llama_cpp") is None:
                from convobot.errors import MissingExtraError

                raise MissingExtraError("backend=llama_cpp needs llama-cpp-python: pip install 'convobot[gguf]'")
            return backend
        if backend == "auto":
            return "llama_cpp" if llama_ok and importlib.util.find_spec("llama_cpp") is not None else "torch"
        return backend

    def _gguf(self, folder: Path) -> Path:
        """The bundle's GGUF of `gguf_type`, exported and checked by convobot export-gguf when absent."""
        from convobot.config import GGUFConfig
        from convobot.release.gguf import export_gguf, gguf_path

        path = gguf_path(folder, self.cfg.gguf_type)
        if not path.is_file():
            print(f"convobot serve: {folder} has no {path.name}: exporting it with convobot export-gguf (checked "
                  "against PyTorch with llama.cpp)", flush=True)
            export_gguf(GGUFConfig(model=str(folder), types=[self.cfg.gguf_type],
                                   verify_checksums=self.cfg.verify_checksums))
        return path

    # ----------------------------------------------------------------- while serving

    def load_adapter(self, model_id: str, path: str) -> Served:
        """POST /v1/load_lora_adapter: `path` on the served base it belongs to; refused if none is served."""
        with self.lock:
            if model_id in self.models:
                raise ConfigError(f"lora_name: {model_id!r} is already served")
        source = resolve(f"{model_id}:{path}")
        if source.kind != "adapter":
            raise ModelPathError(f"lora_path: {path} is not an adapter (a run dir with adapter/, or a folder with "
                                 "adapter_config.json)")
        group = self._group_for(source.base_key)
        if group is None:
            raise ModelPathError(f"lora_path: the base of {path} ({source.base_id}) is not served here; serve it "
                                 "with another adapter of it, or start a server for it")
        if source.dora:
            group = self._new_adapter_group(source)
        else:
            group.engine.call(lambda: self._load_into(group, source))
        with self.lock:
            self.models[model_id] = Served(model_id, group, str(source.path), group.base_id)
            return self.models[model_id]

    def add(self, path: str) -> Served:
        """A run dir, adapter or bundle served from now on (the page's Runs tab), or the model already serving it."""
        source = resolve(path)
        with self.lock:
            for served in self.models.values():
                if Path(served.path).resolve() == source.path.resolve():
                    return served
            if source.model_id in self.models:
                raise ConfigError(f"path: another model is already served as {source.model_id!r}")
        if source.kind == "adapter" and not source.dora and self._group_for(source.base_key) is not None:
            return self.load_adapter(source.model_id, str(path))
        with self.adding:  # one model loads at a time; requests go on meanwhile
            self.load([f"{source.model_id}:{path}"])
        return self.models[source.model_id]

    def unload_adapter(self, model_id: str) -> None:
        """POST /v1/unload_lora_adapter: new requests are refused at once; the adapter's weights go when its running
        requests have finished."""
        with self.lock:
            served = self.models.get(model_id)
            if served is None or model_id not in served.group.adapters:
                raise ModelPathError(f"lora_name: {model_id!r} is not a served adapter")
            served.group.removing.add(model_id)
        group, name = served.group, served.group.adapters[model_id]
        while group.engine.busy_with(name):
            time.sleep(0.05)
        if group.base_key is None:  # a DoRA adapter's own base goes with it
            group.engine.stop()
            self.groups.remove(group)
        else:
            group.engine.call(lambda: group.model.delete_adapter(name))
        with self.lock:
            del self.models[model_id], group.adapters[model_id]
            group.removing.discard(model_id)

    def stop(self) -> None:
        for group in self.groups:
            group.engine.stop()


def tokenizer_folder(source: Source) -> str:
    """Where an adapter's tokenizer is: beside it (a run saves one), or, for a plain peft adapter saved without one,
    with its base."""
    if any((source.path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return str(source.path)
    return source.base_ref or str(source.path)


def base_model(source: Source):
    """A plain adapter folder's base: a local save_pretrained folder or a Hub id (safetensors only)."""
    import torch
    from transformers import AutoModelForCausalLM

    if Path(source.base_ref).is_dir():
        return load_folder(Path(source.base_ref))
    return AutoModelForCausalLM.from_pretrained(source.base_ref, dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=False).eval()


def bundle_defaults(folder: Path) -> GenerationOptions:
    """The sampling settings a request leaves out: the bundle's generation_config.json (convobot merge wrote it)."""
    path = folder / "generation_config.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if not saved.get("do_sample"):
        return GenerationOptions(max_new_tokens=0, temperature=0.0, top_p=1.0,
                                 repetition_penalty=saved.get("repetition_penalty") or 1.0)
    return GenerationOptions(max_new_tokens=0, temperature=saved.get("temperature") or 1.0,
                             top_p=saved.get("top_p") or 1.0, repetition_penalty=saved.get("repetition_penalty") or 1.0)
