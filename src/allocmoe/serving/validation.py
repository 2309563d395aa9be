"""Request bodies of `allocmoe serve` checked against the OpenAI schema (types and ranges) before generation.

`validate_request(endpoint, body, ctx)` returns the validated request or raises `RequestError(400)` naming the
first bad field. Fields that transformers' server would silently ignore (`n` > 1, `presence_penalty`,
`logprobs`, `echo`, `best_of`, ...) are refused rather than ignored; unknown fields are left to transformers'
own check (422 naming them). Checks that need the tokenized prompt (its length against the context) are made
by the generation manager (`app.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import json

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .limits import RequestError

Int64 = Annotated[int, Field(ge=-(2 ** 63), le=2 ** 64 - 1)]
# generation_config keys with a checked type/range; any other GenerationConfig attribute passes through
GENERATION_CONFIG_CHECKS = {
    "max_new_tokens": (int, 1, None), "min_new_tokens": (int, 0, None), "max_length": (int, 1, None),
    "temperature": ((int, float), 0, None), "top_p": ((int, float), 0, 1), "top_k": (int, 0, None),
    "min_p": ((int, float), 0, 1), "repetition_penalty": ((int, float), 1e-6, None),
    "num_beams": (int, 1, 1), "num_return_sequences": (int, 1, 1), "do_sample": (bool, None, None),
}
CHAT_TEMPLATE_RESERVED = {"conversation", "add_generation_prompt", "tools", "return_tensors", "return_dict",
                          "tokenize", "load_audio_from_video", "messages"}


@dataclass
class ValidationContext:
    vocab_size: int | None = None
    continuous_batching: bool = False


class CommonRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    stream: bool | None = None
    stream_options: dict | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: int | None = None
    seed: Int64 | None = None
    stop: Any = None
    frequency_penalty: Annotated[float, Field(gt=-1, le=2)] | None = None  # repetition_penalty = 1 + it
    presence_penalty: Any = None
    generation_config: Any = None
    user: str | None = None

    @field_validator("n", mode="after")
    @classmethod
    def one_choice(cls, v):
        if v is not None and v != 1:
            raise ValueError("only n=1 is supported (send n requests instead)")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def stop_strings(cls, v):
        if v is None:
            return v
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not 1 <= len(v) <= 4 or not all(isinstance(s, str) and s for s in v):
            raise ValueError("must be a non-empty string or a list of 1 to 4 non-empty strings")
        return v

    @field_validator("presence_penalty", mode="before")
    @classmethod
    def no_presence_penalty(cls, v):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v != 0):
            raise ValueError("not supported (only 0)")
        return v

    @field_validator("generation_config", mode="before")
    @classmethod
    def generation_config_json(cls, v):
        if v is None:
            return v
        if not isinstance(v, str):
            raise ValueError("must be a string holding a JSON object of GenerationConfig fields")
        try:
            obj = json.loads(v)
        except ValueError:
            raise ValueError("is not valid JSON") from None
        if not isinstance(obj, dict):
            raise ValueError("must be a JSON object of GenerationConfig fields")
        from transformers import GenerationConfig

        known = GenerationConfig()
        for key, val in obj.items():
            if not hasattr(known, key):
                raise ValueError(f"unknown GenerationConfig field {key!r}")
            check = GENERATION_CONFIG_CHECKS.get(key)
            if check is None or val is None:
                continue
            types, lo, hi = check
            if (isinstance(val, bool) and types is not bool) or not isinstance(val, types):
                raise ValueError(f"{key} has the wrong type")
            if (lo is not None and val < lo) or (hi is not None and val > hi):
                raise ValueError(f"{key} out of range" + (" (only 1 is supported)" if lo == hi == 1 else ""))
        try:
            GenerationConfig(**obj)
        except Exception as e:  # transformers' own validation
            raise ValueError(str(e).splitlines()[0]) from None
        return v

    def refuse_ignored(self, names: dict) -> None:
        """Fields transformers' server ignores: refuse any value that would change the result."""
        extra = self.model_extra or {}
        for name, default in names.items():
            if name in extra and extra[name] not in default:
                raise RequestError(400, f"{name}: not supported (allowed: {sorted(map(str, default))})", name)


class CompletionRequest(CommonRequest):
    prompt: Annotated[str, Field(min_length=1)]
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def one_prompt(cls, v):
        if isinstance(v, list):
            raise ValueError("only a single string is supported (not a list of prompts or token ids)")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text", "input_text", "output_text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict] | None = None

    @field_validator("tool_calls", mode="after")
    @classmethod
    def tool_call_arguments(cls, v):
        for tc in v or []:
            fn = tc.get("function", tc)
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError("each tool call needs a function name")
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except ValueError:
                    raise ValueError("function arguments must be a JSON object") from None
            if not isinstance(args, dict):
                raise ValueError("function arguments must be a JSON object")
        return v


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["function"]
    function: dict

    @field_validator("function", mode="after")
    @classmethod
    def named(cls, v):
        if not isinstance(v.get("name"), str) or not v["name"]:
            raise ValueError("needs a name")
        return v


class ChatRequest(CommonRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    tools: list[Tool] | None = None
    chat_template_kwargs: dict | None = None

    @field_validator("chat_template_kwargs", mode="after")
    @classmethod
    def no_reserved(cls, v):
        bad = sorted(set(v or {}) & CHAT_TEMPLATE_RESERVED)
        if bad:
            raise ValueError(f"may not set {', '.join(bad)}")
        return v


IGNORED = {  # field -> the values that change nothing (anything else is refused)
    "completions": {"echo": (False, None), "best_of": (1, None), "logprobs": (None, 0)},
    "chat": {"logprobs": (False, None), "top_logprobs": (None, 0), "response_format": (None, {"type": "text"}),
             "modalities": (None, ["text"]), "audio": (None,), "functions": (None,), "function_call": (None,),
             "prediction": (None,)},
}
CB_UNSUPPORTED = ("temperature", "top_p", "seed", "stop", "frequency_penalty", "generation_config", "logit_bias",
                  "suffix")


def _param(loc: tuple) -> str:
    """`messages.0.content` from a pydantic location, without the union-branch tags pydantic adds."""
    tags = {"str", "int", "float", "bool", "dict", "list", "none"}
    parts = [str(p) for p in loc if isinstance(p, int) or (p not in tags and "[" not in str(p)
                                                          and "-" not in str(p))]
    return ".".join(parts) or "body"


def validate_request(endpoint: str, body: dict, ctx: ValidationContext | None = None):
    """The validated request of `endpoint` ("completions" or "chat"), or RequestError(400) naming the field."""
    ctx = ctx or ValidationContext()
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    cls = CompletionRequest if endpoint == "completions" else ChatRequest
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _param(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "is required"
        raise RequestError(400, f"{param}: {msg}", param) from None
    req.refuse_ignored(IGNORED[endpoint])
    if endpoint == "chat" and req.logit_bias and ctx.vocab_size:
        for k in req.logit_bias:
            if not (k.isdigit() and int(k) < ctx.vocab_size):
                raise RequestError(400, f"logit_bias: key {k!r} is not a token id below {ctx.vocab_size}",
                                   "logit_bias")
    if ctx.continuous_batching:
        for name in CB_UNSUPPORTED:
            v = getattr(req, name, None)
            if v is not None and not (name == "temperature" and v == 0):
                raise RequestError(400, f"{name}: not supported with --continuous-batching (transformers' "
                                   "continuous batching shares one greedy generation config)", name)
    return req
