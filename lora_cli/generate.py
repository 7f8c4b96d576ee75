"""`lora generate`: answer prompts with a base model, an adapter or a merged model, or chat with it.

transformers' `generate()` does the decoding and `TextStreamer` the streaming. Around them:
- TARGET is resolved as everywhere in lora (models.py); an adapter folder brings its base with it, loaded as in
  training (NF4 for QLoRA adapters), with the tokenizer and chat template saved next to the adapter.
- Prompts go one at a time, without padding, so a prompt's greedy answer does not depend on what else was asked;
  `complete_batch()` answers many at once, left-padded, for `lora eval`, where throughput matters more.
- Generation stops on the generation config's EOS, the tokenizer's EOS and the chat template's end-of-turn
  token: a generation config that names only <|endoftext|> would otherwise run past the end of the answer.
- Temperature 0 means greedy and clears the sampling settings a model's generation config may carry.
- --compare-base answers with PEFT's `disable_adapter()` on the same weights instead of loading the base twice.
"""

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from lora_cli.data import TEXT_ENCODING
from lora_cli.embedded import EMBEDDED_NAME
from lora_cli.errors import LoraError
from lora_cli.models import (
    attach_adapter,
    end_of_turn_id,
    has_accelerator,
    is_adapter_folder,
    load_adapter_base,
    load_gguf,
    load_model,
    load_tokenizer,
    looks_like_path,
    not_an_adapter,
    pick_dtype,
    read_adapter,
    resolve_model_path,
    token_ids,
)
from lora_cli.recipe import QuantizationSection

ROLES = ("system", "user", "assistant")


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise LoraError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise LoraError(f"--temperature must be 0 (greedy) or more, got {self.temperature}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise LoraError(f"--top-p must be above 0 and at most 1, got {self.top_p}.")
        if self.top_k is not None and self.top_k < 1:
            raise LoraError(f"--top-k must be at least 1, got {self.top_k}.")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise LoraError(f"--repetition-penalty must be positive (1 means none), got {self.repetition_penalty}.")


@dataclass
class Prompt:
    text: str | None = None  # a plain prompt
    messages: list[dict] | None = None  # a conversation ending with a user turn
    reference: str | None = None  # the answer a JSONL row carried (a last assistant turn, or 'completion')

    @property
    def label(self) -> str:
        if self.text is not None:
            return self.text
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


@dataclass
class Completion:
    prompt: Prompt
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (an EOS) or "length" (max_new_tokens)
    base: "Completion | None" = None  # --compare-base: the base model's answer

    def to_json(self) -> dict:
        row = {"prompt": self.prompt.label}
        if self.prompt.messages is not None:
            row["messages"] = self.prompt.messages
        row.update(completion=self.text, prompt_tokens=self.prompt_tokens,
                   completion_tokens=self.completion_tokens, finish_reason=self.finish_reason)
        if self.prompt.reference is not None:
            row["reference"] = self.prompt.reference
        if self.base is not None:
            row["base"] = {"completion": self.base.text, "completion_tokens": self.base.completion_tokens,
                           "finish_reason": self.base.finish_reason}
        return row


@dataclass
class Target:
    """A loaded TARGET: the model (a PeftModel for adapters), its tokenizer and what to stop on."""

    name: str
    model: object
    tokenizer: object
    is_adapter: bool
    base: str | None = None  # adapters: their base model's name
    stop_ids: list[int] = field(default_factory=list)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def load_target(target: str, base: str | None = None, load_in_4bit: bool = False) -> Target:
    """An adapter folder (with its base), a model folder, a hub id, a GGUF file or the embedded model, ready to use."""
    kind = target_kind(target)
    is_adapter = kind == "adapter"
    if base and not is_adapter:
        raise LoraError(f"--base is for adapter targets; '{target}' is a model.")
    four_bit = QuantizationSection(load_in_4bit=True) if load_in_4bit else None
    device_map = "auto" if has_accelerator() else None
    if is_adapter:
        info = read_adapter(target, base)
        model, path = load_adapter_base(info, pick_dtype(info.model.dtype), four_bit or info.quantization, device_map)
        tokenizer = load_tokenizer(str(info.folder) if info.has_tokenizer else path, info.model.trust_remote_code)
        model = attach_adapter(model, info)
        base_name = info.base
    elif kind == "gguf":
        if load_in_4bit:
            raise LoraError(f"--load-in-4bit: '{target}' is a GGUF file, quantized in its own way already.")
        model, tokenizer = load_gguf(Path(target).expanduser(), pick_dtype("auto"), "cuda" if device_map else None)
        base_name = None
    else:
        path = resolve_model_path(target, "TARGET")
        tokenizer = load_tokenizer(path, field="TARGET")
        model = load_model(path, pick_dtype("auto"), four_bit, device_map=device_map, field="TARGET")
        base_name = None
    model.eval()
    stop = [model.generation_config.eos_token_id, tokenizer.eos_token_id, end_of_turn_id(tokenizer)]
    stop_ids = list(dict.fromkeys(i for value in stop for i in token_ids(value)))
    return Target(target, model, tokenizer, is_adapter, base_name, stop_ids)


def target_kind(target: str) -> str:
    if target.lower() == EMBEDDED_NAME:
        return "model"
    path = Path(target).expanduser()
    if path.is_dir():
        if is_adapter_folder(path):
            return "adapter"
        if not (path / "config.json").is_file():
            hint = not_an_adapter(path)
            if "training did not finish" in hint:  # a lora train output folder from a stopped run
                raise LoraError(f"TARGET: {hint}")
            raise LoraError(
                f"TARGET '{target}' is neither an adapter folder (no adapter_config.json) nor a model folder "
                "(no config.json)."
            )
        return "model"
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf"
    if path.exists():
        raise LoraError(f"TARGET '{target}' is a file; give an adapter folder, a model folder, a .gguf file or a hub "
                        "id.")
    if looks_like_path(target) or target.count("/") > 1:
        raise LoraError(f"TARGET: the folder '{target}' does not exist.")
    return "model"  # a hub id


def read_prompts(prompts=(), prompts_file=None) -> list[Prompt]:
    """--prompt texts, then the prompts file: one prompt a line, or JSONL rows with 'prompt' or 'messages'."""
    items = [Prompt(text=p) for p in prompts]
    if prompts_file is not None:
        items += _read_prompts_file(Path(prompts_file))
    return items


def _read_prompts_file(path: Path) -> list[Prompt]:
    if not path.is_file():
        raise LoraError(f"--prompts-file: '{path}' does not exist.")
    text = path.read_text(encoding=TEXT_ENCODING)
    if text.lstrip().startswith("["):  # a JSON array of rows rather than JSON lines
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise LoraError(f"{path}: not valid JSON ({e}).") from None
        return [prompt_from_row(row, f"{path}, item {number}") for number, row in enumerate(rows, 1)]
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    jsonl = path.suffix in (".jsonl", ".json") or first.lstrip().startswith("{")
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            items.append(Prompt(text=line))
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise LoraError(f"{where}: not valid JSON ({e}); a JSONL prompts file has one object a line.") from None
        items.append(prompt_from_row(row, where))
    if not items:
        raise LoraError(f"--prompts-file: '{path}' has no prompts.")
    return items


def prompt_from_row(row, where: str) -> Prompt:
    if not isinstance(row, dict):
        raise LoraError(f"{where}: each line must be a JSON object with 'prompt' or 'messages'.")
    reference = row.get("completion")
    if isinstance(reference, list):  # TRL's conversational prompt-completion rows
        reference = next((m.get("content") for m in reference if isinstance(m, dict)), None)
    if isinstance(row.get("prompt"), str):
        return Prompt(text=row["prompt"], reference=reference)
    messages = row.get("messages", row.get("prompt"))
    if not isinstance(messages, list) or not messages:
        keys = ", ".join(row) or "none"
        raise LoraError(f"{where}: the row has neither a 'prompt' string nor a 'messages' list (its keys: {keys}).")
    for message in messages:
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise LoraError(f"{where}: each message needs a 'role' ({', '.join(ROLES)}) and a 'content' string.")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if messages[-1]["role"] == "assistant":  # a training row: answer its question, keep its answer as reference
        reference = messages.pop()["content"]
    if not messages or messages[-1]["role"] != "user":
        raise LoraError(f"{where}: the conversation must end with a user message to answer.")
    return Prompt(messages=messages, reference=reference)


def encode(target: Target, prompt: Prompt, system: str | None = None, raw: bool = False) -> list[int]:
    """Token ids for a prompt: through the chat template when the tokenizer has one and --raw is off."""
    tokenizer = target.tokenizer
    if raw or not target.has_chat_template:
        why = "--raw sends text as is" if raw else f"the tokenizer of '{target.name}' has no chat template"
        if prompt.messages is not None:
            raise LoraError(f"{why}, so prompts given as 'messages' cannot be used; give plain 'prompt' text.")
        if system is not None:
            raise LoraError(f"{why}, so --system has nowhere to go; put the instructions in the prompt text.")
        return tokenizer(prompt.text).input_ids
    messages = prompt.messages or [{"role": "user", "content": prompt.text}]
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids  # the template already wrote BOS where it wants one


def complete(
    target: Target, prompt: Prompt, ids: list[int], sampling: Sampling, on_text=None, use_adapter: bool = True
) -> Completion:
    """One answer; on_text(piece) receives its text as it comes. use_adapter=False answers with the base."""
    import contextlib

    import torch
    from transformers import set_seed

    set_seed(sampling.seed)
    streamer = _streamer(target.tokenizer, on_text) if on_text else None
    off = target.model.disable_adapter() if target.is_adapter and not use_adapter else contextlib.nullcontext()
    input_ids = torch.tensor([ids], device=target.model.device)
    with off, torch.no_grad():
        output = target.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=_generation_config(target, sampling),
            streamer=streamer,
        )
    new = output[0, len(ids):].tolist()
    finish = "stop" if new and new[-1] in target.stop_ids else "length"
    text = target.tokenizer.decode(new, skip_special_tokens=True).strip()
    return Completion(prompt, text, prompt_tokens=len(ids), completion_tokens=len(new), finish_reason=finish)


def complete_batch(target: Target, prompts: list[Prompt], encoded: list[list[int]], sampling: Sampling,
                   use_adapter: bool = True) -> list[Completion]:
    """Answers to several prompts in one generate() call, left-padded so every row's answer starts at the same
    column. Greedy answers match complete()'s up to floating-point ties: padding changes the shapes of the matmuls."""
    import contextlib

    import torch
    from transformers import set_seed

    set_seed(sampling.seed)
    config = _generation_config(target, sampling)
    width = max(len(ids) for ids in encoded)
    pad = config.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=target.model.device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=target.model.device)
    off = target.model.disable_adapter() if target.is_adapter and not use_adapter else contextlib.nullcontext()
    with off, torch.no_grad():
        output = target.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    results = []
    for prompt, ids, row in zip(prompts, encoded, output[:, width:].tolist()):
        stop = next((i for i, token in enumerate(row) if token in target.stop_ids), None)
        new = row if stop is None else row[: stop + 1]  # after its stop token a finished row holds padding
        text = target.tokenizer.decode(new, skip_special_tokens=True).strip()
        finish = "stop" if stop is not None else "length"
        results.append(Completion(prompt, text, prompt_tokens=len(ids), completion_tokens=len(new),
                                  finish_reason=finish))
    return results


def _generation_config(target: Target, sampling: Sampling):
    config = copy.deepcopy(target.model.generation_config)
    greedy = sampling.temperature == 0
    pad = config.pad_token_id if config.pad_token_id is not None else target.tokenizer.pad_token_id
    config.update(
        max_new_tokens=sampling.max_new_tokens,
        max_length=None,
        do_sample=not greedy,
        eos_token_id=target.stop_ids or None,
        pad_token_id=pad if pad is not None else (target.stop_ids or [None])[0],
    )
    if greedy:  # the model's recommended sampling settings would only draw warnings
        config.update(temperature=None, top_p=None, top_k=None, min_p=None, typical_p=None)
    else:
        config.temperature = sampling.temperature
        config.top_p = sampling.top_p if sampling.top_p is not None else config.top_p
        config.top_k = sampling.top_k if sampling.top_k is not None else config.top_k
    if sampling.repetition_penalty is not None:
        config.repetition_penalty = sampling.repetition_penalty
    return config


def _streamer(tokenizer, on_text):
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            on_text(text + "\n" if stream_end else text)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate(
    target: str,
    prompts=(),
    prompts_file=None,
    system: str | None = None,
    raw: bool = False,
    sampling: Sampling | None = None,
    compare_base: bool = False,
    load_in_4bit: bool = False,
    base: str | None = None,
    on_text=None,
) -> list[Completion]:
    """Answer each prompt with TARGET (and with its base, for --compare-base); on_text streams a single prompt."""
    sampling = sampling or Sampling()
    sampling.check()
    items = read_prompts(prompts, prompts_file)
    if not items:
        raise LoraError("No prompts: give --prompt TEXT, --prompts-file FILE, or --chat.")
    if on_text is not None and (len(items) > 1 or compare_base):
        raise LoraError("--stream prints one answer as it is generated: give a single prompt, without --compare-base.")
    if compare_base and not is_adapter_folder(target):
        raise LoraError(f"--compare-base needs an adapter folder as TARGET; '{target}' is not one.")
    loaded = load_target(target, base, load_in_4bit)
    encoded = [encode(loaded, item, system, raw) for item in items]  # every prompt checked before generating
    results = []
    for item, ids in zip(items, encoded):
        result = complete(loaded, item, ids, sampling, on_text)
        if compare_base:
            result.base = complete(loaded, item, ids, sampling, use_adapter=False)
        results.append(result)
    return results


def chat(target: Target, sampling: Sampling, system: str | None = None, read=input, write=print) -> None:
    """A multi-turn chat in the terminal: history kept, /reset clears it, /exit or end of input leaves."""
    if not target.has_chat_template:
        raise LoraError(f"--chat needs a chat template, and the tokenizer of '{target.name}' has none.")
    sampling.check()
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    limit = getattr(target.model.config, "max_position_embeddings", None)
    write(f"Chatting with {target.name}. /reset clears the history, /exit leaves.")
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = list(start)
            write("(history cleared)")
            continue
        if text.startswith("/"):
            write(f"Unknown command {text}: /reset clears the history, /exit leaves.")
            continue
        history.append({"role": "user", "content": text})
        prompt = Prompt(messages=history)
        ids = encode(target, prompt)
        while limit and len(ids) + sampling.max_new_tokens > limit and len(history) > len(start) + 1:
            del history[len(start):len(start) + 2]  # the oldest exchange goes first
            ids = encode(target, prompt)
        answer = complete(target, prompt, ids, sampling, on_text=lambda piece: write(piece, end="", flush=True))
        history.append({"role": "assistant", "content": answer.text})
