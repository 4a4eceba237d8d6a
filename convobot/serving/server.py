"""An OpenAI-compatible HTTP API over bundles, runs and adapters: chat completions and completions (streamed or not),
models, and adapters loaded and dropped while serving.

Examples:
    convobot serve model=release/convobot-gpt2-alpaca                 # http://127.0.0.1:8000/v1
    convobot serve models=[release/bot,outputs/lora-run,outputs/dora-run] api_key=secret
    convobot serve model=outputs/demo/release backend=torch port=8080 model_id=convobot-demo

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    reply = client.chat.completions.create(model="release", temperature=0,
        messages=[{"role": "user", "content": "Reverse the order of the words.\\n\\n### Input:\\napple bird cat"}])

Requests decode together (engine.py: continuous batching), on PyTorch or, for merged bundles on the CPU, on the
bundle's GGUF through llama.cpp (`backend=auto` picks, and says so at start-up). Adapters of one base share one copy
of it and decode in one batch with each other and with the base (models.py). Prompts are built by the model's chat
template, so an answer equals `convobot chat`'s for the same turns and settings; settings a request leaves out come
from a bundle's generation_config.json. Bundles are checked against their SHA256SUMS before loading.

`ui=true` adds a page at /ui (ui.py): chat, an arena of the served models side by side, and run reports.

Locked down and bounded: `api_key` (or CONVOBOT_API_KEY) guards every /v1 and /ui/api route (401 without it;
/health and the page itself stay public); bodies over `max_body_bytes` get a 413, prompts are cut by characters before tokenizing (a huge message
costs what the context costs), requests past `max_queued` waiting get a 429 with Retry-After; SIGTERM stops taking
requests, finishes those running, and exits 0.

`transformers serve` is the maintained server of this stack; convobot has its own because that one answers a
malformed conversation with a 500, does not bound max_tokens by the context, verifies no checksums, batches no
adapters and serves one model.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import json
import logging
import os
import secrets
import signal

import hydra

from convobot.cli import run_command
from convobot.config import COMMANDS_CONF_DIR, GenerationOptions, ServeConfig
from convobot.data.conversations import order_problem
from convobot.data.examples import char_budget
from convobot.errors import ConfigError, MissingExtraError, UserError
from convobot.serving.api import (
    Answer,
    ChatRequest,
    CompletionRequest,
    LoadAdapter,
    RequestError,
    Sampling,
    UnloadAdapter,
    refuse_unsupported,
    usage,
)
from convobot.serving.engine import Delta, Done, Failed, QueueFull, Request
from convobot.serving.models import Registry, Served, parse_spec
from convobot.serving.sampling import SamplingParams
from convobot.template import ROLES, render_prompt

log = logging.getLogger(__name__)

# A refused body is read and dropped up to this size, then the connection is closed.
DRAINED = 64 * 2**20
# The routes the API key guards: the API, and the page's data (the page itself holds none).
GUARDED = ("/v1", "/ui/api")


def require_serve_extra() -> None:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(f"convobot serve needs {', '.join(missing)}: pip install 'convobot[serve]'")


def text_of(content, turn: int) -> str:
    """A message's content as text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if content is None:
        raise RequestError(f"messages[{turn}].content is required", f"messages[{turn}].content")
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError(f"messages[{turn}].content: only text parts are supported, got {part.get('type')!r}",
                               f"messages[{turn}].content")
        parts.append(part["text"])
    return "".join(parts)


def conversation(messages: list) -> list[dict]:
    """The request's messages as chat-template messages, refused (400) when the template cannot render them."""
    if not messages:
        raise RequestError("messages must hold at least one user message", "messages")
    turns = []
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise RequestError(f"messages[{index}].role: {message.role!r} is not supported ({', '.join(ROLES)})",
                               f"messages[{index}].role")
        turn = {"role": message.role, "content": text_of(message.content, index)}
        if message.input:
            turn["input"] = message.input
        turns.append(turn)
    problem = order_problem(turns, last="user")
    if problem:
        raise RequestError(f"messages: {problem}", "messages")
    return turns


class Prompts:
    """Prompt text -> token ids for one model, bounded by its context before and after tokenizing."""

    def __init__(self, served: Served):
        self.tokenizer, self.context = served.group.tokenizer, served.group.context
        self.budget = char_budget(self.tokenizer, self.context)

    def ids(self, text: str, param: str = "messages") -> list[int]:
        if len(text) > self.budget:  # more characters than the context can hold tokens: not worth tokenizing
            raise RequestError(f"this model's maximum context length is {self.context} tokens; the prompt is longer "
                               f"({len(text):,} characters)", param, code="context_length_exceeded")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def sampling(request: Sampling, ids: list[int], context: int, defaults: GenerationOptions,
             logprobs: bool, top_logprobs: int) -> SamplingParams:
    """What the engine samples with: the request's settings, the model's defaults for those it leaves out, and
    max_tokens checked against the room the prompt leaves in the context."""
    room = context - len(ids)
    asked = request.max_new
    prompt = "prompt" if isinstance(request, CompletionRequest) else "messages"
    if room <= 0 or (asked is not None and asked > room and not isinstance(request, CompletionRequest)):
        raise RequestError(f"this model's maximum context length is {context} tokens; the prompt is {len(ids)} tokens"
                           + (f" and max_tokens is {asked}" if asked is not None else "")
                           + f" ({max(room, 0)} tokens are left for the answer)",
                           prompt if room <= 0 else "max_tokens", code="context_length_exceeded")
    return SamplingParams(
        max_tokens=min(asked or room, room),
        temperature=defaults.temperature if request.temperature is None else request.temperature,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        repetition_penalty=(defaults.repetition_penalty if request.repetition_penalty is None
                            else request.repetition_penalty),
        seed=request.seed, stop=request.stops(), logprobs=logprobs, top_logprobs=top_logprobs,
        ignore_eos=request.ignore_eos)


async def generate(served: Served, ids: list[int], params: SamplingParams, n: int):
    """The engine's events for one request, as an async iterator; the request is cancelled if the reader stops."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    request = Request(ids, params, lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                      served.group.adapter_name(served.model_id), n)
    try:
        served.group.engine.submit(request)
    except QueueFull as err:
        raise RequestError(f"the server is busy: {err}; retry shortly", None, 429, "rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from err
    try:
        while True:
            event = await events.get()
            yield event
            if isinstance(event, (Done, Failed)):
                return
    finally:
        request.cancel()  # a no-op once it is done; frees the rows of a stream the client dropped


def create_app(registry: Registry, cfg: ServeConfig):
    """The FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /v1/load_lora_adapter,
    /v1/unload_lora_adapter, /health."""
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="convobot", description="OpenAI-compatible API over " + ", ".join(registry.models))
    add_guards(app, cfg)

    @app.exception_handler(RequestError)
    def request_error(_: HTTPRequest, err: RequestError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(UserError)
    def user_error(_: HTTPRequest, err: UserError):
        return JSONResponse(RequestError(str(err)).body(), status_code=400)

    @app.exception_handler(Exception)
    def server_error(_: HTTPRequest, err: Exception):
        log.error("request failed", exc_info=err)
        return JSONResponse(RequestError(f"the server failed to answer: {type(err).__name__}: {err}", status=500)
                            .body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    def invalid_request(_: HTTPRequest, err: RequestValidationError):
        problems = [f"{'.'.join(str(part) for part in item['loc'][1:]) or 'body'}: {item['msg']}"
                    for item in err.errors()]
        first = ".".join(str(part) for part in err.errors()[0]["loc"][1:]) if err.errors() else None
        return JSONResponse(RequestError("invalid request: " + "; ".join(problems), first or None,
                                         code="invalid_request").body(), status_code=400)

    async def answer(kind: str, request: Sampling, served: Served, ids: list[int], logprobs: bool, top: int):
        params = sampling(request, ids, served.group.context, served.group.defaults, logprobs, top)
        built = Answer(kind, served.model_id, served.group.tokenizer, request.n, logprobs)
        events = generate(served, ids, params, request.n)
        first = await anext(events)  # a full queue is refused before the response starts
        if not request.stream:
            event = first
            while not isinstance(event, Done):
                if isinstance(event, Failed):
                    raise RequestError(event.message, status=500)
                built.add(event)
                event = await anext(events)
            return built.whole(event.prompt_tokens, event.completion_tokens)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return StreamingResponse(stream(built, first, events, request.n, include_usage, kind),
                                 media_type="text/event-stream")

    async def stream(built: Answer, first, events, n: int, include_usage: bool, kind: str):
        extra = {"usage": None} if include_usage else {}

        def line(body: dict) -> str:
            return f"data: {json.dumps(body)}\n\n"

        try:
            if kind == "chat":
                for index in range(n):
                    yield line(built.chunk([built.opening(index)], **extra))
            event = first
            while True:
                if isinstance(event, Delta):
                    yield line(built.chunk([built.delta_choice(event)], **extra))
                elif isinstance(event, Failed):
                    yield line(RequestError(event.message, status=500).body())
                    break
                elif isinstance(event, Done):
                    if include_usage:
                        yield line(built.chunk([], usage=usage(event.prompt_tokens, event.completion_tokens)))
                    break
                event = await anext(events)
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        refuse_unsupported(request, cfg.max_n)
        served = registry.get(request.model)
        turns = conversation(request.messages)
        prompts = Prompts(served)
        ids = await run_in_threadpool(lambda: prompts.ids(render_prompt(prompts.tokenizer, turns)))
        return await answer("chat", request, served, ids, request.logprobs, request.top_logprobs or 0)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        """The raw prompt continued, no template (OpenAI's legacy completions)."""
        refuse_unsupported(request, cfg.max_n)
        served = registry.get(request.model)
        prompts = Prompts(served)
        ids = await run_in_threadpool(prompts.ids, request.text(), "prompt")
        return await answer("text", request, served, ids, request.logprobs is not None, request.logprobs or 0)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": s.model_id, "object": "model", "created": s.created,
                                            "owned_by": "convobot", "root": s.path, "parent": s.parent}
                                           for s in registry.models.values() if s.model_id not in
                                           s.group.removing]}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapter):
        """vLLM's endpoint: serve one more adapter of a served base (a run dir or an adapter folder)."""
        await run_in_threadpool(registry.load_adapter, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapter):
        await run_in_threadpool(registry.unload_adapter, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/health")
    def health():
        return {"status": "ok", "models": sorted(registry.models)}

    if cfg.ui:
        from convobot.serving.ui import add_ui

        add_ui(app, registry, cfg)
    return app


def add_guards(app, cfg: ServeConfig) -> None:
    """The API key on every /v1 route, and the body size limit, as ASGI middleware (before any parsing)."""
    key = cfg.api_key or os.environ.get("CONVOBOT_API_KEY") or None
    limit = cfg.max_body_bytes

    def refusal(message: str, status: int, kind: str, code: str) -> tuple[int, bytes]:
        error = RequestError(message, None, status, code, kind)
        return status, json.dumps(error.body()).encode()

    class Guards:
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            headers = dict(scope["headers"])
            refused = None
            if key and scope["path"].startswith(GUARDED):
                given = headers.get(b"authorization", b"").decode(errors="replace")
                if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
                    refused = refusal("missing or wrong API key: send 'Authorization: Bearer <key>'", 401,
                                      "authentication_error", "invalid_api_key")
            length = headers.get(b"content-length")
            if refused is None and length is not None and length.isdigit() and int(length) > limit:
                refused = too_large(int(length))
            if refused is not None:
                await drain(receive)
                return await reply(send, *refused)
            return await self.inner(scope, counted(receive, send), send)

    def too_large(size: int) -> tuple[int, bytes]:
        return refusal(f"the request body is {size:,} bytes; this server takes at most {limit:,} "
                       "(config key 'max_body_bytes')", 413, "invalid_request_error", "request_too_large")

    async def drain(receive) -> None:
        """Read what the client sends before refusing it (up to DRAINED bytes, none of it kept), so that a client
        that sends its whole body before reading the answer gets the refusal instead of a broken pipe."""
        drained, more = 0, True
        while more and drained <= DRAINED:
            message = await receive()
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)

    def counted(receive, send):
        """A body sent without Content-Length (chunked) is counted as it arrives."""
        seen = 0

        async def wrapped():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                await reply(send, *too_large(seen))
                raise ConnectionAbortedError("request body over max_body_bytes")
            return message

        return wrapped

    async def reply(send, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    app.add_middleware(Guards)


def describe(registry: Registry, cfg: ServeConfig) -> list[str]:
    """What start-up says: each model, its backend and, for an adapter, its base."""
    lines = []
    for served in registry.models.values():
        group = served.group
        kind = (f"adapter of {served.parent}" if served.parent else
                "base model" if group.adapters else "merged release")
        backend = ("llama.cpp on the bundle's " + cfg.gguf_type + " GGUF" if group.backend == "llama_cpp" else
                   f"PyTorch on {registry.device.type}")
        lines.append(f"  {served.model_id}: {kind}, {backend}")
    return lines


def serve(cfg: ServeConfig) -> None:
    """Load and verify the models, then answer requests until SIGTERM / Ctrl-C."""
    require_serve_extra()
    import uvicorn

    specs = list(cfg.models) + ([cfg.model] if cfg.model else [])
    if not specs:
        raise ConfigError("config key 'models': nothing to serve: pass model=<bundle> or models=[...]")
    if cfg.model_id and len(specs) == 1 and parse_spec(specs[0])[0] is None:
        specs = [f"{cfg.model_id}:{specs[0]}"]
    registry = Registry(cfg)
    registry.load(specs)
    warning = network_warning(cfg)
    if warning:
        print(f"convobot serve: WARNING: {warning}", flush=True)
    print(f"convobot serve: http://{cfg.host}:{cfg.port}/v1 (chat/completions, completions, models)", flush=True)
    if cfg.ui:
        print(f"convobot serve: the page at http://{cfg.host}:{cfg.port}/ui", flush=True)
    print("\n".join(describe(registry, cfg)), flush=True)
    app = create_app(registry, cfg)
    # uvicorn stops on SIGTERM once the running requests are answered, then raises the signal again for the handler
    # it found: this one, so that a requested stop ends the process normally (status 0).
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    finally:
        registry.stop()


def network_warning(cfg: ServeConfig) -> str | None:
    """What to say at start-up when the server is reachable from the network and no API key guards it."""
    if cfg.api_key or os.environ.get("CONVOBOT_API_KEY"):
        return None
    try:
        if ipaddress.ip_address(cfg.host).is_loopback:
            return None
    except ValueError:
        if cfg.host == "localhost":
            return None
    return (f"host={cfg.host} serves the network and no api_key is set: anyone who can reach it can use it "
            "(api_key=... or CONVOBOT_API_KEY)")


@hydra.main(config_path=str(COMMANDS_CONF_DIR), config_name="serve", version_base="1.3")
def main(raw) -> None:
    """Hydra entry point: `convobot serve model=<bundle> | models=[...] [host=127.0.0.1] [port=8000]`."""
    run_command("convobot-serve", ServeConfig, serve, raw)


if __name__ == "__main__":
    main()
