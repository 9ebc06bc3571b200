"""OpenAI's completions API, and the endpoints evaluation harnesses call around it:

    POST /v1/completions   prompt (a string, strings, token ids, or lists of token ids), max_tokens
                           (0 with echo: the prompt's own log-probabilities), temperature, top_p,
                           n, stop, seed, stream (server-sent events ending in `data: [DONE]`),
                           echo, logprobs (0-5 alternatives per position)
    GET  /v1/models        the one model, by the name requests give as "model"
    POST /tokenize         {"prompt"} -> {"tokens", "count", "max_model_len"}   (vLLM's shape)
    POST /detokenize       {"tokens"} -> {"prompt"}
    GET  /tokenizer_info   eos_token and the tokenizer's rules

Errors on these use OpenAI's shape, {"error": {"message", "type", "param", "code"}} (guard.py).
The work itself is in completions.py; this module turns requests into its arguments and its
deltas into OpenAI's JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import Field, ValidationError
from rnnlm.serve import completions
from rnnlm.serve.completions import Delta, Prompt, Sampling, Usage
from rnnlm.serve.guard import ApiError
from rnnlm.serve.responses import AdmittedStream, deadline_of, timed
from rnnlm.serve.runtime import MAX_NEW_TOKENS, LanguageModel
from rnnlm.serve.schemas import _Strict

from rnnlm.errors import RnnlmError

if TYPE_CHECKING:
    from rnnlm.serve.server import ServerState

log = logging.getLogger("rnnlm.serve")
MAX_LOGPROBS = 5  # OpenAI's limit on alternatives per position
MAX_MODEL_LEN = 2**31 - 1  # no context limit: a recurrent model's whole context is its state


def model_name(lm: LanguageModel) -> str:
    """models/rhn/onnx -> "rhn"; a bundle directory elsewhere -> its own name."""
    path = lm.bundle.path
    return path.parent.name if path.name == "onnx" else path.name


# ---------------------------------------------------------------------------- bodies
class CompletionRequest(_Strict):
    model: str = Field(description="The model's name, as GET /v1/models lists it.")
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, texts, token ids (as /tokenize returns), or lists of token ids. In a text, a line "
        'ending in "\\n" ends in <eos>.', examples=["the stock market"])
    max_tokens: int | None = Field(16, description="Tokens to generate per choice; 0 (with echo) scores the prompt only.")
    temperature: float | None = Field(1.0, description="0 is greedy (argmax).")
    top_p: float | None = 1.0
    top_k: int | None = Field(None, description="An extension (as vLLM's): sample from the k most likely tokens.")
    n: int | None = Field(1, description="Choices per prompt.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end a choice (not included).")
    seed: int | None = Field(None, description="The same seed gives the same text (as `rnnlm generate --seed`).")
    stream: bool | None = False
    stream_options: dict[str, bool] | None = Field(None, description='{"include_usage": true} adds a last chunk '
                                                   "with the usage.")
    echo: bool | None = Field(False, description="Return the prompt before the completion (with its logprobs).")
    logprobs: int | None = Field(None, description="0-5: log-probabilities of the tokens and of that many "
                                 "alternatives per position.")
    best_of: int | None = None
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # no effect: the first token is always predicted from <eos>


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


router = APIRouter(tags=["OpenAI-compatible"])


# ---------------------------------------------------------------------------- checks
def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(message, status=400, param=param)


def _check_model(lm: LanguageModel, name: str | None) -> None:
    if name is not None and name != model_name(lm):
        raise ApiError(f"the model {name!r} does not exist; this server has {model_name(lm)!r} (GET /v1/models)",
                       status=404, param="model", kind="model_not_found")


def _sampling(lm: LanguageModel, body: CompletionRequest) -> Sampling:
    """The request's sampling arguments, refused as OpenAI would (400, naming the parameter)."""
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    n = 1 if body.n is None else body.n
    if not 0 <= max_tokens <= MAX_NEW_TOKENS:
        raise _bad(f"max_tokens must be between 0 and {MAX_NEW_TOKENS:,}, got {max_tokens}", "max_tokens")
    if max_tokens == 0 and not body.echo:
        raise _bad("max_tokens 0 generates nothing: give echo=true to score the prompt", "max_tokens")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise _bad(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {body.logprobs}", "logprobs")
    if body.best_of not in (None, n):
        raise _bad("best_of is not supported (other than equal to n)", "best_of")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name) not in (None, 0.0):
            raise _bad(f"{name} is not supported (other than 0)", name)
    if body.logit_bias:
        raise _bad("logit_bias is not supported", "logit_bias")
    if body.suffix is not None:
        raise _bad("suffix is not supported", "suffix")
    if set(body.stream_options or {}) - {"include_usage"}:
        raise _bad("stream_options takes include_usage only", "stream_options")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > 4 or any(not s for s in stop):
        raise _bad("stop takes up to 4 non-empty strings", "stop")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = None if body.top_p in (None, 1.0) else body.top_p
    try:
        lm.check_generate("".join(stop), max_new_tokens=max(max_tokens, 1), temperature=temperature, top_k=body.top_k,
                          top_p=top_p, num_samples=n, seed=body.seed)
    except RnnlmError as e:
        raise _bad(e.message) from None
    return Sampling(max_tokens, temperature, top_p, body.top_k, n, body.seed, stop, bool(body.echo), body.logprobs)


def _prompts(lm: LanguageModel, prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    """Every prompt of a request, tokenized (texts) or checked (token ids)."""
    if isinstance(prompt, str):
        return [completions.text_prompt(lm, prompt)]
    if not prompt:
        raise _bad("prompt is an empty list", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [completions.text_prompt(lm, str(p)) for p in prompt]
    lists: list[list[int]] = [prompt] if all(isinstance(p, int) for p in prompt) else prompt  # type: ignore[assignment,list-item]
    out = []
    for ids in lists:
        bad = [t for t in ids if not 0 <= t < len(lm.vocab)]
        if bad:
            raise _bad(f"token id {bad[0]} is not in the vocabulary (0 to {len(lm.vocab) - 1})", "prompt")
        out.append(completions.ids_prompt(lm, ids))
    return out


# ---------------------------------------------------------------------------- completions
@router.post("/v1/completions", summary="OpenAI completions: continue or score prompts",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": CompletionRequest.model_json_schema()}}}},
             responses={200: {"content": {"text/event-stream": {}}, "description": "A completion, or with stream=true "
                        "server-sent events `data: {chunk}` ending in `data: [DONE]`"}})
async def create_completion(request: Request) -> Any:
    state: ServerState = request.app.state.rnnlm
    lm, scheduler = state.working()
    body = await _parse(request)
    _check_model(lm, body.model)
    args = _sampling(lm, body)
    # In a thread: tokenizing a 1 MiB prompt takes a good part of a second, which on the event loop
    # would stall every other request, health checks included.
    prompts = await asyncio.to_thread(_prompts, lm, body.prompt)
    asked = len(prompts) * args.n * args.max_tokens
    if asked > state.settings.max_generate_tokens:
        raise _bad(f"prompts * n * max_tokens = {asked:,} tokens; this server's limit is "
                   f"{state.settings.max_generate_tokens:,} per request (rnnlm serve --max-generate-tokens)", "max_tokens")
    kind = "generate" if args.max_tokens else "score"
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": model_name(lm)}
    work = _work(lm, prompts, args)
    if body.stream:
        admission = scheduler.admit(kind)
        admission.__enter__()  # 429 now, as a status, not inside a started stream
        usage = bool((body.stream_options or {}).get("include_usage"))
        events = _sse(scheduler.stream(kind, work), head, usage, deadline_of(request, state.settings.timeout),
                      state.settings.timeout)
        return AdmittedStream(events, admission.__exit__, deadline_of(request, state.settings.timeout))
    with scheduler.admit(kind):
        deltas = await timed(request, _collect(scheduler.stream(kind, work)), state.settings.timeout)
    reply = await asyncio.to_thread(lambda: json.dumps({**head, **_assemble(deltas, len(prompts) * args.n)}))
    state.metrics.generated.inc(sum(d.completion_tokens for d in deltas if isinstance(d, Usage)))
    return Response(reply, media_type="application/json")


async def _parse(request: Request) -> CompletionRequest:
    """The body, parsed and validated in a thread: a 1 MiB prompt takes tens of milliseconds to
    parse, which on the event loop would delay every other request (health checks included)."""
    raw = await request.body()
    try:
        return await asyncio.to_thread(CompletionRequest.model_validate_json, raw)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


def _work(lm: LanguageModel, prompts: list[Prompt], args: Sampling) -> Callable[[Callable[[], bool]], Any]:
    return lambda cancelled: completions.run(lm, prompts, args, cancelled)


async def _collect(items: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in items]


def _assemble(deltas: list[Delta | Usage], choices: int) -> dict[str, Any]:
    """A whole response from its deltas: each choice's text and logprob arrays joined."""
    out: list[dict[str, Any]] = [{"text": "", "index": i, "logprobs": None, "finish_reason": None} for i in range(choices)]
    usage = None
    for d in deltas:
        if isinstance(d, Usage):
            usage = d
            continue
        c = out[d.index]
        c["text"] += d.text
        if d.logprobs is not None:
            c["logprobs"] = c["logprobs"] or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for key, values in d.logprobs.items():
                c["logprobs"][key].extend(values)
        c["finish_reason"] = d.finish_reason or c["finish_reason"]
    assert usage is not None
    return {"choices": out, "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                                      "total_tokens": usage.prompt_tokens + usage.completion_tokens}}


async def _sse(items: AsyncIterator[Any], head: dict[str, Any], usage: bool, deadline: float,
               timeout: float) -> AsyncGenerator[str, None]:
    """OpenAI's stream: one `data: {chunk}` per delta, the usage chunk if asked, `data: [DONE]`.
    A failure after the status line is an error chunk (OpenAI's error shape), then [DONE]."""
    def data(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    try:
        while True:
            try:
                item = await asyncio.wait_for(items.__anext__(), max(deadline - time.monotonic(), 0.0))
            except StopAsyncIteration:
                break
            if isinstance(item, Usage):
                if usage:
                    yield data({**head, "choices": [], "usage": {
                        "prompt_tokens": item.prompt_tokens, "completion_tokens": item.completion_tokens,
                        "total_tokens": item.prompt_tokens + item.completion_tokens}})
                continue
            yield data({**head, "choices": [{"text": item.text, "index": item.index, "logprobs": item.logprobs,
                                             "finish_reason": item.finish_reason}]})
    except asyncio.TimeoutError:
        yield data({"error": {"message": f"the request ran past its {timeout:g} s timeout and was cancelled",
                              "type": "timeout", "param": None, "code": None}})
    except RnnlmError as e:
        yield data({"error": {"message": e.message, "type": "invalid_request_error", "param": None, "code": None}})
    except Exception:
        log.exception("a completion stream failed")
        yield data({"error": {"message": "internal error (see the server log)", "type": "server_error", "param": None,
                              "code": None}})
    finally:
        await items.aclose()  # type: ignore[attr-defined]
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------- the rest
@router.get("/v1/models", summary="The model this server serves (OpenAI's list shape)")
async def list_models(request: Request) -> dict[str, Any]:
    lm, _ = request.app.state.rnnlm.working()
    created = int((lm.bundle.path / "manifest.json").stat().st_mtime)
    return {"object": "list", "data": [{"id": model_name(lm), "object": "model", "created": created,
                                        "owned_by": "rnnlm", "max_model_len": MAX_MODEL_LEN}]}


@router.post("/tokenize", summary="Token ids of a text, as /v1/completions reads it (vLLM's shape)")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    lm, _ = request.app.state.rnnlm.working()
    _check_model(lm, body.model)
    tokens = lm.prompt_tokens(body.prompt)
    return {"count": len(tokens), "max_model_len": MAX_MODEL_LEN, "tokens": [t.id for t in tokens],
            "token_strs": [lm.vocab[t.id] for t in tokens]}


@router.post("/detokenize", summary="The text of token ids (vLLM's shape)")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    lm, _ = request.app.state.rnnlm.working()
    _check_model(lm, body.model)
    bad = [t for t in body.tokens if not 0 <= t < len(lm.vocab)]
    if bad:
        raise _bad(f"token id {bad[0]} is not in the vocabulary (0 to {len(lm.vocab) - 1})", "tokens")
    return {"prompt": completions.ids_prompt(lm, body.tokens).text}


@router.get("/tokenizer_info", summary="The tokenizer: its special tokens and rules")
async def tokenizer_info(request: Request) -> JSONResponse:
    lm, _ = request.app.state.rnnlm.working()
    tok = lm.tokenizer
    return JSONResponse({"tokenizer_class": "rnnlm", "level": lm.level, "vocab_size": len(lm.vocab),
                         "eos_token": tok.eos, "eos_token_id": tok.eos_id, "unk_token": tok.unk,
                         "unk_token_id": tok.unk_id, "bos_token": None, "pad_token": None,
                         "model_max_length": MAX_MODEL_LEN, "normalization": tok.spec.to_json(),
                         "note": "a line ending in a newline ends in eos_token; the first token is predicted "
                                 "from eos_token"})
