"""GGUF files (an exported model, the embedded SmolLM2) read into a plain transformers model.

transformers reads GGUF and dequantizes it, but flags the model as quantized, which neither training, saving nor the
Trainer accept; so the weights move into a plain model of the same config. torch and transformers are imported in
the function: the embedded model's module is imported when `lora --help` starts.
"""

import contextlib
import functools
import os
from pathlib import Path

from lora_cli.errors import LoraError, first_line


def load_gguf(path: Path, dtype, device=None, field: str = "TARGET"):
    """(model, tokenizer) from a GGUF file, dequantized by transformers' GGUF reader. transformers flags such a model
    as quantized, which neither training nor the Trainer accept, so its weights move into a plain model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with one_parse_per_file():
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise LoraError(
            f"{field}: the GGUF file '{path}' cannot be loaded by transformers' GGUF reader: {first_line(e)} "
            "(it reads the architectures and quantization types listed in transformers' GGUF documentation)."
        ) from None
    config = quantized.config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(quantized.state_dict(), assign=True)
    for name, buffer in quantized.named_buffers():  # buffers outside the state dict (RoPE's inverse frequencies)
        owner, _, attr = name.rpartition(".")
        if getattr(model.get_submodule(owner), attr).is_meta:
            setattr(model.get_submodule(owner), attr, buffer)
    model.tie_weights()
    model.generation_config = quantized.generation_config
    return (model.to(device) if device else model), tokenizer


@contextlib.contextmanager
def one_parse_per_file():
    """transformers parses the GGUF file anew for the tokenizer, the config and the weights (three calls of its
    load_gguf_checkpoint), and builds gguf's tensor name map anew for every module of the model (397 times for the
    embedded SmolLM2). gguf's reader only reads the file and the map only answers lookups, so within this block each
    is made once for the same arguments: load_gguf of the embedded SmolLM2 took 14.3 s instead of 22.1 on a 2-core
    CPU (2026-12-07), with the same weights and tokenizer."""
    import gguf

    made = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map")}
    for name, make in made.items():
        setattr(gguf, name, _made_once(make))
    try:
        yield
    finally:
        for name, make in made.items():
            setattr(gguf, name, make)


def _made_once(make):
    """make, memoized by its arguments, a path taken as its string (transformers passes one, our callers a Path)."""
    cached = functools.cache(make)
    return lambda *args, **kwargs: cached(*(os.fspath(a) if isinstance(a, os.PathLike) else a for a in args), **kwargs)
