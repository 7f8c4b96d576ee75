"""The OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions, /v1/completions (streaming as server-sent
events), on FastAPI. Every error leaves as OpenAI's error object with its status (400 bad body, 401 missing or
wrong key, 404 unknown model or path, 500 a failure of ours, logged here without reaching the client), and a
request that fails never stops the server.
"""

import json
import logging
import queue
import threading
import time
import uuid

from lora_cli.errors import LoraError
from lora_cli.serve.schemas import ChatRequest, CompletionRequest, error_body

log = logging.getLogger("lora.serve")
DEFAULT_MAX_TOKENS = 256


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, param, code)


def create_app(registry, api_key: str | None = None):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="lora serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse(error_body("Missing or incorrect API key: send 'Authorization: Bearer KEY' with the "
                                           "key lora serve was started with (--api-key).", "authentication_error",
                                           code="invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return JSONResponse(error.body, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request, error: RequestValidationError):
        problems = []
        for item in error.errors():
            where = ".".join(str(p) for p in item["loc"] if p != "body")
            problems.append("the body is not valid JSON" if item["type"] == "json_invalid"
                            else f"{where or 'body'}: {item['msg']}")
        first = next((".".join(str(p) for p in e["loc"] if p != "body") for e in error.errors()
                      if e["type"] != "json_invalid"), None)
        return JSONResponse(error_body("Invalid request: " + "; ".join(problems), "invalid_request_error",
                                       param=first or None), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {error.detail}", kind),
                            status_code=error.status_code)

    @app.exception_handler(Exception)
    async def failure(request, error: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        return JSONResponse(error_body("The server failed to answer this request; its log has the details.",
                                       "server_error"), status_code=500)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": served.owned_by}
            for name, served in registry.models.items()]}

    @app.post("/v1/chat/completions")
    def chat(body: ChatRequest):
        from lora_cli.generate import Prompt

        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if messages[-1]["role"] != "user":
            raise ApiError(400, "The last message must be the user's: the model answers it.", "invalid_request_error",
                           param="messages")
        return _answer(body, Prompt(messages=messages), "chat.completion",
                       body.max_completion_tokens or body.max_tokens)

    @app.post("/v1/completions")
    def completions(body: CompletionRequest):
        from lora_cli.generate import Prompt

        return _answer(body, Prompt(text=body.prompt), "text_completion", body.max_tokens)

    def _answer(body, prompt, kind: str, max_tokens: int | None):
        from lora_cli.generate import Sampling

        served = registry.models.get(body.model)
        if served is None:
            raise ApiError(404, f"The model '{body.model}' does not exist here; this server has: "
                           f"{', '.join(registry.models)}.", "invalid_request_error", param="model",
                           code="model_not_found")
        sampling = Sampling(max_new_tokens=max_tokens or DEFAULT_MAX_TOKENS, temperature=body.temperature,
                            top_p=body.top_p if body.temperature > 0 else None,
                            seed=body.seed if body.seed is not None else int(time.time()), stop=tuple(body.stop or ()))
        reply = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                 "created": int(time.time()), "model": body.model}
        if body.stream:
            return StreamingResponse(_stream(served, prompt, sampling, kind, reply), media_type="text/event-stream")
        result = _run(served, prompt, sampling)
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
        if kind == "chat.completion":
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "finish_reason": result.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
        return {**reply, "object": kind, "choices": [choice], "usage": usage}

    def _run(served, prompt, sampling, on_text=None):
        try:
            return registry.complete(served, prompt, sampling, on_text)
        except LoraError as e:  # a prompt the model cannot take (no chat template, too long)
            raise ApiError(400, " ".join(str(e).split()), "invalid_request_error") from None

    def _stream(served, prompt, sampling, kind: str, reply: dict):
        """Server-sent events: OpenAI's chunks as the text comes, the finish reason, then [DONE]."""
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
        pieces: queue.Queue = queue.Queue()
        outcome = {}

        def produce():
            try:
                outcome["result"] = _run(served, prompt, sampling, pieces.put)
            except ApiError as e:
                outcome["error"] = e.body
            except Exception:  # logged here; the client gets an error event, the server goes on
                log.exception("streamed request failed")
                outcome["error"] = error_body("The server failed while answering; its log has the details.",
                                              "server_error")
            pieces.put(None)

        def event(delta: dict | None = None, text: str | None = None, finish: str | None = None) -> str:
            choice = {"index": 0, "finish_reason": finish, "logprobs": None}
            choice.update({"delta": delta or {}} if chunk_kind != "text_completion" else {"text": text or ""})
            return f"data: {json.dumps({**reply, 'object': chunk_kind, 'choices': [choice]})}\n\n"

        threading.Thread(target=produce, daemon=True).start()
        if chunk_kind != "text_completion":
            yield event({"role": "assistant", "content": ""})
        held, last = StopFilter(sampling.stop), ""
        while (piece := pieces.get()) is not None:
            if text := held.feed(last):
                yield event({"content": text}, text)
            last = piece
        if "error" in outcome:
            yield f"data: {json.dumps(outcome['error'])}\n\n"
        else:
            # generate's streamer ends the text with a terminal's newline
            if text := held.feed(last.removesuffix("\n")) + held.flush():
                yield event({"content": text}, text)
            yield event(finish=outcome["result"].finish_reason)
        yield "data: [DONE]\n\n"

    return app


class StopFilter:
    """Streamed text up to the first stop string: text that may begin one is held until it is decided."""

    def __init__(self, stops):
        self.stops, self.pending, self.stopped = list(stops), "", False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        cuts = [self.pending.index(s) for s in self.stops if s in self.pending]
        if cuts:
            self.stopped = True
            return self.pending[: min(cuts)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        ready, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return ready

    def flush(self) -> str:
        text, self.pending = ("" if self.stopped else self.pending), ""
        return text
