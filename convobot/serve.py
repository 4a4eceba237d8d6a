"""An OpenAI-compatible HTTP API over a bundle: chat completions (streamed or not), completions, models.

Examples:
    convobot-serve model=release/convobot-gpt2-alpaca                 # http://127.0.0.1:8000/v1
    convobot-serve model=outputs/demo/release port=8080 model_id=convobot-demo

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    reply = client.chat.completions.create(model="release", temperature=0,
        messages=[{"role": "user", "content": "Reverse the order of the words.\\n\\n### Input:\\napple bird cat"}])

Prompts are built by the bundle's chat template, so an answer equals `convobot-chat`'s for the same turns and
settings; settings a request leaves out come from the bundle's generation_config.json, as in convobot-chat.
`max_tokens` is bounded by the context: a request whose prompt and max_tokens do not fit gets a 400, as from
OpenAI. One model answers one request at a time (requests queue, each answered whole); the bundle is checked
against its SHA256SUMS before it is loaded.

`transformers serve` is the maintained server of this stack, and it serves a local bundle offline with its chat
template; convobot has its own because that one answers a malformed conversation with a 500 and a traceback,
does not bound max_tokens by the context and does not verify the bundle's checksums.
"""

import importlib.util
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional, Union

import hydra

from convobot.cli import run_command
from convobot.config import COMMANDS_CONF_DIR, GenerationOptions, ServeConfig
from convobot.conversations import order_problem
from convobot.errors import MissingExtraError
from convobot.generate import stream_continuation
from convobot.modeling import context_length, resolve_device
from convobot.rundir import load_model
from convobot.template import ROLES, render_prompt


def require_serve_extra() -> None:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(f"convobot-serve needs {', '.join(missing)}: pip install 'convobot[serve]'")


class RequestError(Exception):
    """A request the server cannot answer: an OpenAI-style error body with this status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def text_of(content, turn: int) -> str:
    """A message's content as text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
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


class Server:
    """The loaded model and what answering a request needs; one request generates at a time."""

    def __init__(self, model, tokenizer, model_id: str):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.context = context_length(model.config)
        saved = model.generation_config
        self.defaults = GenerationOptions(max_new_tokens=self.context, temperature=saved.temperature or 0.0,
                                          top_p=saved.top_p or 1.0, repetition_penalty=saved.repetition_penalty or 1.0)
        if not saved.do_sample:
            self.defaults.temperature = 0.0
        self.lock = threading.Lock()
        self.created = int(time.time())

    def check_model(self, requested: str | None) -> None:
        if requested not in (None, self.model_id):
            raise RequestError(f"the model {requested!r} does not exist; this server serves {self.model_id!r}",
                               "model", status=404, code="model_not_found")

    def prepare(self, prompt: str, request) -> tuple[list[int], GenerationOptions]:
        """The prompt's ids and the generation options, with max_tokens checked against the context."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        room = self.context - len(ids)
        asked = request.max_completion_tokens if getattr(request, "max_completion_tokens", None) else request.max_tokens
        if room <= 0 or (asked is not None and asked > room):
            raise RequestError(f"this model's maximum context length is {self.context} tokens; the prompt is "
                               f"{len(ids)} tokens" + (f" and max_tokens is {asked}" if asked is not None else "")
                               + f" ({max(room, 0)} tokens are left for the answer)", "max_tokens",
                               code="context_length_exceeded")
        options = GenerationOptions(
            max_new_tokens=asked or room,
            temperature=self.defaults.temperature if request.temperature is None else request.temperature,
            top_p=self.defaults.top_p if request.top_p is None else request.top_p,
            repetition_penalty=(self.defaults.repetition_penalty if request.repetition_penalty is None
                                else request.repetition_penalty))
        return ids, options

    def generate(self, ids: list[int], options: GenerationOptions, seed: int | None) -> Iterator[tuple[str, list]]:
        """Yield (text piece, tokens so far) while holding the model; the last piece's tokens are final."""
        from transformers import set_seed

        generated: list[int] = []
        with self.lock:
            if seed is not None:
                set_seed(seed)
            for piece in stream_continuation(self.model, self.tokenizer, ids, options, generated):
                yield piece, generated
        yield "", generated

    def finish_reason(self, generated: list[int]) -> str:
        return "stop" if generated and generated[-1] == self.tokenizer.eos_token_id else "length"


def create_app(server: Server):
    """The FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /health."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, Field

    class Message(BaseModel):
        role: str
        content: Union[str, list[dict]]
        input: Optional[str] = None  # the Alpaca input of a user turn (convobot's chat template)
        name: Optional[str] = None

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class Sampling(BaseModel):
        model: Optional[str] = None
        max_tokens: Optional[int] = Field(None, ge=1)
        temperature: Optional[float] = Field(None, ge=0, le=2)
        top_p: Optional[float] = Field(None, gt=0, le=1)
        repetition_penalty: Optional[float] = Field(None, gt=0)  # as vLLM's extra parameter
        seed: Optional[int] = None
        n: int = Field(1, ge=1, le=1)
        stream: bool = False
        stream_options: Optional[StreamOptions] = None
        stop: Optional[Union[str, list[str]]] = None
        user: Optional[str] = None

    class ChatRequest(Sampling):
        messages: list[Message]
        max_completion_tokens: Optional[int] = Field(None, ge=1)

    class CompletionRequest(Sampling):
        prompt: str

    app = FastAPI(title="convobot", description=f"OpenAI-compatible API over {server.model_id}")

    def error(message: str, status: int, param: str | None = None, code: str | None = None) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                            status_code=status)

    @app.exception_handler(RequestError)
    def request_error(_: Request, err: RequestError):
        return error(str(err), err.status, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    def invalid_request(_: Request, err: RequestValidationError):
        problems = [f"{'.'.join(str(part) for part in item['loc'][1:]) or 'body'}: {item['msg']}"
                    for item in err.errors()]
        return error("invalid request: " + "; ".join(problems), 400, None, "invalid_request")

    def refuse_unsupported(request: Sampling) -> None:
        if request.stop:
            raise RequestError("stop sequences are not supported; the model stops at its EOS token", "stop")

    def usage(ids: list[int], generated: list[int]) -> dict:
        return {"prompt_tokens": len(ids), "completion_tokens": len(generated),
                "total_tokens": len(ids) + len(generated)}

    def answer(request: Sampling, ids: list[int], options: GenerationOptions, kind: str):
        """A whole response, or an event stream of chunks, for the chat or the text completion `kind`."""
        response_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": response_id, "created": int(time.time()), "model": server.model_id}
        if not request.stream:
            text, generated = "", []
            for piece, generated in server.generate(ids, options, request.seed):
                text += piece
            finish = server.finish_reason(generated)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                      if kind == "chat" else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
            return head | {"object": "chat.completion" if kind == "chat" else "text_completion",
                           "choices": [choice], "usage": usage(ids, generated)}

        def events() -> Iterator[str]:
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

            def chunk(delta_or_text, finish=None, **extra) -> str:
                choice = ({"index": 0, "delta": delta_or_text, "finish_reason": finish} if kind == "chat"
                          else {"index": 0, "text": delta_or_text, "finish_reason": finish, "logprobs": None})
                return f"data: {json.dumps(head | {'object': obj, 'choices': [choice]} | extra)}\n\n"

            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""})
            generated: list[int] = []
            for piece, generated in server.generate(ids, options, request.seed):
                if piece:
                    yield chunk({"content": piece} if kind == "chat" else piece)
            yield chunk({} if kind == "chat" else "", server.finish_reason(generated))
            if request.stream_options and request.stream_options.include_usage:
                yield f"data: {json.dumps(head | {'object': obj, 'choices': [], 'usage': usage(ids, generated)})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest):
        server.check_model(request.model)
        refuse_unsupported(request)
        turns = conversation(request.messages)
        ids, options = server.prepare(render_prompt(server.tokenizer, turns), request)
        return answer(request, ids, options, "chat")

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        """The raw prompt continued, no template (as OpenAI's legacy completions)."""
        server.check_model(request.model)
        refuse_unsupported(request)
        ids, options = server.prepare(request.prompt, request)
        return answer(request, ids, options, "text")

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.created,
                                            "owned_by": "convobot"}]}

    @app.get("/health")
    def health():
        return {"status": "ok", "model": server.model_id}

    return app


def serve(cfg: ServeConfig) -> None:
    """Load and verify the bundle, then answer requests until interrupted (Ctrl-C / SIGTERM)."""
    require_serve_extra()
    import uvicorn

    model, tokenizer = load_model(cfg.model, cfg.verify_checksums)
    model.to(resolve_device(cfg.device, key="device")).eval()
    model_id = cfg.model_id or Path(cfg.model).resolve().name
    app = create_app(Server(model, tokenizer, model_id))
    print(f"convobot-serve: {model_id} at http://{cfg.host}:{cfg.port}/v1 (chat/completions, completions, models)",
          flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)


@hydra.main(config_path=str(COMMANDS_CONF_DIR), config_name="serve", version_base="1.3")
def main(raw) -> None:
    """Hydra entry point: `convobot-serve model=<bundle> [host=127.0.0.1] [port=8000]`."""
    run_command("convobot-serve", ServeConfig, serve, raw)


if __name__ == "__main__":
    main()
