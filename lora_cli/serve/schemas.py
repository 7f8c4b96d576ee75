"""The OpenAI request bodies lora serve accepts, as pydantic models (FastAPI validates them), and its errors.

Only what a local server honours is declared; other OpenAI fields (logprobs, tools, ...) are refused with a 400
naming them rather than silently ignored, except the few that change nothing here (user, n=1).
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class Sampled(Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1, le=32768)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: Literal[1] = 1
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)


class CompletionRequest(Sampled):
    prompt: str
    max_tokens: int | None = Field(16, ge=1, le=32768)  # OpenAI's default for completions


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape, which its clients turn into their exception types."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
