"""An Ollama Modelfile beside an exported GGUF: FROM, the chat template in Ollama's Go template language, stop
tokens and the default system prompt.

Ollama cannot run a Jinja chat template, so the template is translated, for the layouts we can recognise: the
model's own template is rendered on marker messages and compared with each known layout (ChatML, Llama 3,
Phi-3). A template that matches none gets no TEMPLATE line, and Ollama falls back to what it reads from the GGUF.
"""

from dataclasses import dataclass
from pathlib import Path

MARKS = {"system": "SYSTEM-MARK", "user": "USER-MARK", "assistant": "ASSISTANT-MARK"}


@dataclass(frozen=True)
class Layout:
    name: str
    turn: str  # one message, with {role} and {content}
    prompt: str  # what opens the assistant's answer
    stop: tuple[str, ...]
    template: str  # Ollama's Go template for the same layout
    bos: str = ""


LAYOUTS = (
    Layout("ChatML", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n", ("<|im_end|>",),
           "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
           "<|im_start|>assistant\n"),
    Layout("Llama 3", "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
           "<|start_header_id|>assistant<|end_header_id|>\n\n", ("<|eot_id|>",),
           "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
           "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n", bos="<|begin_of_text|>"),
    Layout("Phi-3", "<|{role}|>\n{content}<|end|>\n", "<|assistant|>\n", ("<|end|>", "<|endoftext|>"),
           "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"),
)


def _render(tokenizer, messages) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses a system turn, or any other shape
        return None


def recognise(tokenizer) -> tuple[Layout | None, str | None]:
    """(the layout the chat template writes, the system prompt it adds when none is given)."""
    if not getattr(tokenizer, "chat_template", None):
        return None, None
    conversation = [{"role": "user", "content": MARKS["user"]}, {"role": "assistant", "content": MARKS["assistant"]},
                    {"role": "user", "content": MARKS["user"]}]
    with_system = _render(tokenizer, [{"role": "system", "content": MARKS["system"]}, *conversation])
    without = _render(tokenizer, conversation)
    for layout in LAYOUTS:
        def expected(messages):
            return layout.bos + "".join(layout.turn.format(**m) for m in messages) + layout.prompt

        if with_system is None or with_system.removeprefix(tokenizer.bos_token or "\0") != expected(
                [{"role": "system", "content": MARKS["system"]}, *conversation]).removeprefix(tokenizer.bos_token or "\0"):
            continue
        if without == expected(conversation):
            return layout, None
        opening = layout.bos + layout.turn.format(role="system", content="\0")
        head, _, tail = opening.partition("\0")
        if without and without.startswith(head) and tail in without:  # the template's own default system prompt
            default = without[len(head):without.index(tail, len(head))]
            if without == expected([{"role": "system", "content": default}, *conversation]):
                return layout, default
    return None, None


def write_modelfile(folder: Path, gguf_name: str, model_dir: Path, quant: str, name: str, out: Path) -> list[str]:
    """Write FOLDER/Modelfile; returns the lines to print (the ollama create command, cautions)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    layout, system = recognise(tokenizer)
    lines = [f"FROM ./{gguf_name}"]
    notes = []
    if layout is not None:
        lines.append(f'TEMPLATE """{layout.template}"""')
        for stop in layout.stop:
            lines.append(f'PARAMETER stop "{stop}"')
        if system:
            lines.append(f'SYSTEM """{system}"""')
        notes.append(f"Modelfile: the {layout.name} chat template translated for Ollama, stops on "
                     + ", ".join(layout.stop))
    else:
        notes.append("Modelfile: the chat template is not one lora can translate for Ollama; no TEMPLATE line, "
                     "so Ollama uses what it recognises in the GGUF's tokenizer.chat_template.")
    (folder / "Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tag = name.lower()
    notes.append(f"Run it:  ollama create {tag} -f {out / 'Modelfile'} && ollama run {tag}")
    if quant in ("f16", "bf16"):
        notes.append(f"Smaller: ollama create {tag}-q4 --quantize q4_K_M -f {out / 'Modelfile'}  "
                     "(K-quants have no pure-Python quantizer; Ollama makes them from this 16-bit file)")
    else:
        notes.append("For Ollama's K-quants (ollama create --quantize q4_K_M), export --quant f16: Ollama quantizes "
                     "only from 16-bit weights.")
    return notes
