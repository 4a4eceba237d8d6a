"""Serving throughput at GPT-2 small shape: convobot serve (each backend) against llama-cpp-python's own server on
the same weights, one server at a time on this machine, spoken to with the official openai client.

    make bench-serve                                      # installs llama-cpp-python's server, then the line below
    python benchmarks/serve_throughput.py                 # ~15 min on 2 CPU cores
    python benchmarks/serve_throughput.py --device cuda   # convobot's PyTorch backend on a GPU (no llama.cpp)

The model is GPT-2 small's architecture (GPT2Config(), random init, seed 0) with the real GPT-2 tokenizer from
../shared, saved as a bundle with convobot's chat template; its GGUF files are exported and checked by
`convobot export-gguf`. Four LoRA adapters of it (r=8 on c_attn/c_proj/c_fc, random weights) are served together
for the mixed-adapter point. Each point sends real alpaca-gpt4 instructions as chat completions of exactly
`--tokens` new tokens (ignore_eos where the server has it; a random-init model rarely emits EOS), from 1 client
(one request after another) and from 8 concurrent clients, and reports aggregate completion tokens/s and the p50/p95
latency of a request. Results go to benchmarks/results/serve_throughput_<device>_<date>.{md,json} with the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CONVOBOT_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import machine, save_report  # noqa: E402


def build(work: Path, adapters: int) -> tuple[Path, list[Path]]:
    """The bundle and its adapters, made once per work folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from convobot.runs.bundle import write_checksums
    from convobot.template import with_chat_template

    bundle, adapter_dirs = work / "gpt2-small", [work / f"adapter-{i}" for i in range(adapters)]
    if not (bundle / "SHA256SUMS").is_file():
        shutil.rmtree(bundle, ignore_errors=True)
        tokenizer = with_chat_template(GPT2TokenizerFast.from_pretrained(str(SHARED / "gpt2-tokenizer")))
        tokenizer.pad_token = tokenizer.eos_token
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config())
        model.generation_config.pad_token_id = tokenizer.eos_token_id
        model.save_pretrained(bundle)
        tokenizer.save_pretrained(bundle)
        write_checksums(bundle)
    for index, folder in enumerate(adapter_dirs):
        if (folder / "adapter_model.safetensors").is_file():
            continue
        torch.manual_seed(index + 1)
        base = GPT2LMHeadModel.from_pretrained(bundle)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                            init_lora_weights=False, task_type="CAUSAL_LM")
        get_peft_model(base, config).save_pretrained(folder)
        meta = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(meta | {"base_model_name_or_path": str(bundle)}))
    return bundle, adapter_dirs


def export_gguf(bundle: Path, kinds: list[str]) -> None:
    from convobot.config import GGUFConfig
    from convobot.release.gguf import export_gguf as export
    from convobot.release.gguf import gguf_path

    if not all(gguf_path(bundle, kind).is_file() for kind in kinds):
        export(GGUFConfig(model=str(bundle), types=kinds, overwrite=True, check_rows=2, greedy_tokens=8))


def prompts(count: int) -> list[str]:
    rows = [json.loads(line) for line in (SHARED / "alpaca_gpt4" / "eval_sample.jsonl").read_text().splitlines()]
    return [row["instruction"] + (f"\n\n### Input:\n{row['input']}" if row.get("input") else "")
            for row in rows[:count]]


# llama-cpp-python's server, with the model parameters convobot's llama.cpp backend uses (where llama.cpp has AMX,
# its q8_0 kernels crash without them).
LLAMA_SERVER = [sys.executable, "-c", "import runpy; from convobot.release.gguf import llama_class\n"
                "with llama_class(): runpy.run_module('llama_cpp.server', run_name='__main__')"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A server process on a free loopback port, ready when /v1/models answers."""

    def __init__(self, command: list[str], port: int, log: Path):
        self.port, self.log = port, log
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def wait(self, seconds: float = 600) -> None:
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="bench", max_retries=0, timeout=2)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                client.models.list()
                return
            except Exception:
                time.sleep(1)
        raise TimeoutError(f"server not up after {seconds} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def load(port: int, models: list[str], questions: list[str], clients: int, per_client: int, tokens: int,
         ignore_eos: bool) -> dict:
    """`clients` concurrent clients, each sending `per_client` requests one after another (models in turn)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=900)
    extra = {"ignore_eos": True} if ignore_eos else {}

    def one_client(index: int) -> list[tuple[float, int]]:
        done = []
        for k in range(per_client):
            question = questions[(index * per_client + k) % len(questions)]
            started = time.perf_counter()
            reply = client.chat.completions.create(model=models[(index + k) % len(models)], max_tokens=tokens,
                                                   temperature=0, messages=[{"role": "user", "content": question}],
                                                   extra_body=extra)
            done.append((time.perf_counter() - started, reply.usage.completion_tokens))
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [item for part in pool.map(one_client, range(clients)) for item in part]
    wall = time.perf_counter() - started
    latencies = sorted(seconds for seconds, _ in results)
    return {"clients": clients, "requests": len(results), "completion_tokens": sum(n for _, n in results),
            "wall_seconds": wall, "tokens_per_second": sum(n for _, n in results) / wall,
            "p50_latency": statistics.median(latencies),
            "p95_latency": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--work", type=Path, default=Path("outputs/bench-serve"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    bundle, adapters = build(args.work, 4)
    questions = prompts(32)
    cpu = args.device == "cpu"
    if cpu:
        export_gguf(bundle, ["f32", "f16", "q8_0"])
    threads = str(os.cpu_count())
    convobot = [sys.executable, "-m", "convobot", "serve", "log_level=warning", f"device={args.device}"]
    setups = []
    if cpu:
        for kind in ("f32", "q8_0"):
            setups.append((f"llama.cpp server, {kind} GGUF", "llama", [
                *LLAMA_SERVER, "--model", str(bundle / "gguf" / f"model-{kind}.gguf"),
                "--n_threads", threads, "--n_ctx", "1024", "--model_alias", "bot"], ["bot"]))
        for kind in ("f16", "q8_0"):
            setups.append((f"convobot serve, llama.cpp backend, {kind}", "convobot", convobot + [
                f"models=[bot:{bundle}]", "backend=llama_cpp", f"gguf_type={kind}"], ["bot"]))
    setups.append(("convobot serve, PyTorch backend, fp32", "convobot",
                   convobot + [f"models=[bot:{bundle}]", "backend=torch"], ["bot"]))
    mixed = [f"a{i}:{folder}" for i, folder in enumerate(adapters)]
    setups.append(("convobot serve, PyTorch, 4 adapters of one base", "convobot",
                   convobot + [f"models=[{','.join(mixed)}]"], [f"a{i}" for i in range(len(adapters))]))

    rows = []
    for name, kind, command, models in setups:
        port = free_port()
        server = Server(command + ([f"port={port}"] if kind == "convobot" else ["--port", str(port)]), port,
                        args.work / f"server-{len(rows)}.log")
        try:
            server.wait()
            load(port, models, questions, 1, 1, 8, ignore_eos=kind == "convobot")  # warm up
            single = load(port, models, questions, 1, args.requests, args.tokens, ignore_eos=kind == "convobot")
            eight = load(port, models, questions, 8, args.requests, args.tokens, ignore_eos=kind == "convobot")
        finally:
            server.stop()
        rows.append({"server": name, "models": models, "single": single, "eight": eight})
        print(f"{name}: 1 client {single['tokens_per_second']:.1f} tok/s; 8 clients "
              f"{eight['tokens_per_second']:.1f} tok/s, p50 {eight['p50_latency']:.1f} s", flush=True)
    write(rows, args)
    return 0


def write(rows: list[dict], args) -> None:
    from datetime import datetime

    when = datetime.now()
    info = machine(args.device)
    reference = {row["server"]: row for row in rows}
    lines = [f"# Serving throughput at GPT-2 small shape ({args.device}, {when:%Y-%m-%dT%H:%M:%S})", "",
             f"- machine: {info['cpu']} ({info['cpu_cores']} cores; vector ISA: {', '.join(info['isa'])}), "
             f"{info['memory_gib']} GiB RAM; torch {info['versions']['torch']}" + (f"; {info['gpu']}" if 'gpu' in info
                                                                                else ""),
             f"- model: GPT2Config() random init, real GPT-2 tokenizer; chat completions of {args.tokens} new tokens, "
             f"temperature 0, {args.requests} requests per client; real alpaca-gpt4 instructions",
             "- one server at a time, each on every core; the official openai client on loopback",
             "- llama-cpp-python's server loads its model with the parameters convobot's llama.cpp backend uses "
             "(`llama_model_params` in convobot/release/gguf.py)",
             *([f"- note: {args.note}"] if args.note else []), "",
             "| server | 1 client tok/s | 8 clients tok/s | p50 / p95 latency at 8 (s) |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['server']} | {row['single']['tokens_per_second']:.1f} | "
                     f"{row['eight']['tokens_per_second']:.1f} | {row['eight']['p50_latency']:.1f} / "
                     f"{row['eight']['p95_latency']:.1f} |")
    targets = []
    f32, q8 = reference.get("llama.cpp server, f32 GGUF"), reference.get("llama.cpp server, q8_0 GGUF")
    best_single = max(row["single"]["tokens_per_second"] for row in rows if row["server"].startswith("convobot"))
    best_eight = max(row["eight"]["tokens_per_second"] for row in rows if row["server"].startswith("convobot"))
    torch_one = reference.get("convobot serve, PyTorch backend, fp32")
    torch_mixed = reference.get("convobot serve, PyTorch, 4 adapters of one base")
    if f32:
        targets.append(f"- single stream: convobot's best {best_single:.1f} tok/s vs llama.cpp server f32 "
                       f"{f32['single']['tokens_per_second']:.1f}: **{best_single / f32['single']['tokens_per_second']:.2f}x** "
                       "(target >= 1x)")
    if q8:
        targets.append(f"- 8 clients: convobot's best {best_eight:.1f} tok/s vs llama.cpp server q8_0 "
                       f"{q8['eight']['tokens_per_second']:.1f}: **{best_eight / q8['eight']['tokens_per_second']:.2f}x** "
                       "(target >= 1.5x)")
    if torch_one and torch_mixed:
        ratio = torch_mixed["eight"]["tokens_per_second"] / torch_one["eight"]["tokens_per_second"]
        targets.append(f"- 4 adapters mixed vs one model, PyTorch, 8 clients: **{ratio:.2f}x** (target >= 0.8x)")
    lines += ["", *targets, ""]
    print("\n".join(lines))
    save_report(args.out / f"serve_throughput_{args.device}_{when:%Y-%m-%d}", "\n".join(lines),
                {"date": when.isoformat(), "machine": info, "tokens": args.tokens, "rows": rows})


if __name__ == "__main__":
    raise SystemExit(main())
