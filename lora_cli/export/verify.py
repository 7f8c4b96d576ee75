"""Read an exported file back with an independent reader and compare it with the model it came from.

The GGUF is loaded by transformers (`gguf_file=`: its own tensor names, rotary un-permuting and dequantizing,
none of it ours) into the source model's config, and run on lora merge's probe inputs next to the source model,
both in float32. 16-bit files must match within merge's tolerance for that dtype; quantized ones are judged as
llama.cpp's perplexity tool judges quantizations, by top-1 agreement and the KL divergence of the next-token
distributions. The hyperparameters transformers parses from the file, the tokenizer it rebuilds from the file,
and the chat template and special tokens stored in it are compared with the source's too.
"""

from dataclasses import dataclass, field
from pathlib import Path

from lora_cli.gguf_reader import one_parse_per_file
from lora_cli.merge import TOLERANCE, max_diff, probe_inputs, probe_logits

# Least top-1 agreement and largest mean KL (nats) accepted per quantization. Measured on SmolLM2-135M-Instruct,
# whose weights already went through Q4_1 and which, being small, quantizes worse than larger models: q8_0 95.6%
# and 0.0026, q5_0 83% and 0.15, q5_1 74% and 0.23 (docs/export-serve.md). A wrong tensor layout or a dropped
# weight gives a near-random model: a few percent agreement and several nats.
QUANTIZED_LIMITS = {
    "q8_0": (0.90, 0.02),
    "q5_1": (0.60, 0.5),
    "q5_0": (0.60, 0.5),
    "q4_1": (0.50, 1.0),
    "q4_0": (0.50, 1.0),
}
FLOAT_TOLERANCE = {"f16": TOLERANCE["float16"], "bf16": TOLERANCE["bfloat16"]}
TOKENIZER_SAMPLES = (
    "Hello world! How are you today?",
    "Numbers: 3 33 333 3333 3.14159 1,000,000",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "Ünïcödé — naïve café, 日本語, emoji 🚀",
    "def f(x):\n    return x ** 2  # square",
)
CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "max_position_embeddings", "vocab_size", "rms_norm_eps", "head_dim",
                 "sliding_window", "tie_word_embeddings")


@dataclass
class Check:
    passed: bool
    lines: list[str] = field(default_factory=list)  # the report, one line a check
    failures: list[str] = field(default_factory=list)


def verify_gguf(gguf_file: Path, source_dir: Path, quant: str, progress=lambda message: None) -> Check:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check = Check(True)
    config = AutoConfig.from_pretrained(source_dir)
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    probes = probe_inputs(tokenizer)
    progress("Verifying: the source model on the probes ...")
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    reference = probe_logits(source.eval(), probes)
    del source
    progress(f"Verifying: {gguf_file.name} read back by transformers ...")
    import gguf

    with one_parse_per_file():
        exported = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, config=config, dtype=torch.float32
        )
        _compare_logits(check, reference, probe_logits(exported.eval(), probes), quant)
        del exported
        reader = gguf.GGUFReader(gguf_file)
        _compare_config(check, reader, config)
        _compare_tokenizer(check, reader, gguf_file, tokenizer)
    return check


def _compare_logits(check: Check, reference, exported, quant: str) -> None:
    import torch

    largest = max_diff(reference, exported)
    ref = torch.cat([r[0] for r in reference])
    out = torch.cat([e[0] for e in exported])
    agreement = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    measured = f"largest logit difference {largest:.3g}, top-1 agreement {agreement:.1%}, mean KL {kl:.2g}"
    if quant in FLOAT_TOLERANCE:
        limit = FLOAT_TOLERANCE[quant]
        ok = largest <= limit  # NaN fails too
        check.lines.append(f"logits:    {measured} over {len(ref)} positions (tolerance {limit:g} in {quant})")
        if not ok:
            check.failures.append(f"the logits differ by up to {largest:.4g}, above the {quant} tolerance {limit:g}")
    else:
        least, most = QUANTIZED_LIMITS[quant]
        ok = agreement >= least and kl <= most
        check.lines.append(
            f"logits:    {measured} over {len(ref)} positions (limits for {quant}: top-1 at least {least:.0%}, "
            f"KL at most {most:g})"
        )
        if not ok:
            check.failures.append(f"{quant} moves the predictions too far ({measured})")
    check.passed &= ok


def _compare_config(check: Check, reader, config) -> None:
    """The hyperparameters in the file, named as transformers' GGUF reader names them, against config.json's."""
    import math

    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = reader.fields["general.architecture"].contents()
    wanted = config.to_dict()
    differ, compared = [], 0
    for key, name in GGUF_CONFIG_MAPPING.get(arch, {}).items():
        field_ = reader.fields.get(f"{arch}.{key}")
        if name not in CONFIG_FIELDS or field_ is None or wanted.get(name) is None:
            continue
        a, b = field_.contents(), wanted[name]
        compared += 1
        if not (math.isclose(a, b, rel_tol=1e-6) if isinstance(b, float) else a == b):
            differ.append(f"{name} {a} (config.json: {b})")
    if differ:
        check.passed = False
        check.failures.append("the file's hyperparameters differ: " + "; ".join(differ))
    check.lines.append(f"config:    {compared} hyperparameters read back " + ("differ" if differ else "match"))


def _compare_tokenizer(check: Check, reader, gguf_file: Path, tokenizer) -> None:
    """Same ids from the tokenizer rebuilt from the file; same chat template and special tokens in it."""
    from transformers import AutoTokenizer

    rebuilt = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    texts = list(TOKENIZER_SAMPLES)
    if tokenizer.chat_template:
        texts.append(tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenize=False))
    different = [t for t in texts if rebuilt(t, add_special_tokens=False).input_ids
                 != tokenizer(t, add_special_tokens=False).input_ids]
    def stored(key):
        return reader.fields[key].contents() if key in reader.fields else None

    problems = [f"{len(different)} of {len(texts)} sample texts tokenize differently (first: {different[0]!r})"
                ] if different else []
    for name in ("bos", "eos"):
        mine = getattr(tokenizer, f"{name}_token_id")
        if mine is not None and stored(f"tokenizer.ggml.{name}_token_id") != mine:
            problems.append(f"{name} id {stored(f'tokenizer.ggml.{name}_token_id')} instead of {mine}")
    template = stored("tokenizer.chat_template")
    if tokenizer.chat_template and template != tokenizer.chat_template:
        problems.append("the chat template differs from the tokenizer's")
    adds_bos = bool(tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]) if tokenizer.bos_token_id is not None \
        else False
    if bool(stored("tokenizer.ggml.add_bos_token")) != adds_bos:
        problems.append(f"add_bos_token is {stored('tokenizer.ggml.add_bos_token')}, the tokenizer "
                        f"{'adds' if adds_bos else 'does not add'} BOS")
    if problems:
        check.passed = False
        check.failures.append("tokenizer: " + "; ".join(problems))
    chat = "chat template identical" if tokenizer.chat_template else "no chat template"
    check.lines.append(
        f"tokenizer: {len(texts) - len(different)} of {len(texts)} sample texts give the same ids, {chat}, "
        f"BOS/EOS ids and add_bos {'match' if not problems else 'checked'}"
    )
