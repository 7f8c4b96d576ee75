"""The models lora serve answers with, by the name a request gives in `model`.

Adapters of one base share it, as vLLM's multi-LoRA serving does: the base is loaded once with the first adapter
(generate.load_target, so loading is what `lora generate` does) and the others are added to the same PeftModel
with PEFT's load_adapter; a request selects its adapter with set_adapter, and the base's own name answers with
the adapters switched off. Generation is one request at a time (a lock): the model is shared and a CPU or a single
GPU gains nothing from interleaving.
"""

import threading
from dataclasses import dataclass
from pathlib import Path

from lora_cli.errors import LoraError


@dataclass
class Served:
    name: str  # the id clients send as `model`
    target: object  # generate.Target
    adapter: str | None  # PEFT adapter name; None: the base alone (or a plain model)
    owned_by: str  # what it is, for /v1/models


class Registry:
    def __init__(self):
        self.models: dict[str, Served] = {}
        self.lock = threading.Lock()

    def load(self, targets: list[str], load_in_4bit: bool = False, progress=lambda message: None) -> None:
        from lora_cli.generate import target_kind, load_target
        from lora_cli.models import read_adapter, resolve_model_path

        bases: dict[str, object] = {}  # resolved base path -> the Target holding its PeftModel
        for target in targets:
            if target_kind(target) != "adapter":
                progress(f"Loading {target} ...")
                self._add(Path(target).name if Path(target).is_dir() else target, load_target(target, None,
                          load_in_4bit), None, "model")
                continue
            info = read_adapter(target)
            base_path = resolve_model_path(info.base, info.field)
            name = self._unique(Path(target).expanduser().resolve().name)
            if base_path in bases:
                progress(f"Adding the adapter {target} to {info.base} ...")
                shared = bases[base_path]
                try:
                    shared.model.load_adapter(str(info.folder), adapter_name=name)
                except (RuntimeError, ValueError, KeyError) as e:
                    raise LoraError(f"The adapter '{target}' does not fit {info.base}, the base it names: "
                                    f"{str(e).splitlines()[0]}") from None
                self._add(name, shared, name, f"adapter on {info.base}")
                continue
            progress(f"Loading {info.base} with the adapter {target} ...")
            loaded = load_target(target, None, load_in_4bit)
            bases[base_path] = loaded
            self._add(name, loaded, "default", f"adapter on {info.base}")
            if info.base not in self.models:
                self._add(info.base, loaded, None, "base model")

    def _unique(self, name: str) -> str:
        candidate, number = name, 2
        while candidate in self.models:
            candidate, number = f"{name}-{number}", number + 1
        return candidate

    def _add(self, name: str, target, adapter: str | None, owned_by: str) -> None:
        name = self._unique(name)
        self.models[name] = Served(name, target, adapter, owned_by)

    def complete(self, served: Served, prompt, sampling, on_text=None):
        """One answer from SERVED (generate.complete), its adapter selected for the duration."""
        from lora_cli.generate import complete, encode

        with self.lock:
            ids = encode(served.target, prompt, raw=prompt.text is not None)
            if served.adapter is not None:
                served.target.model.set_adapter(served.adapter)
            use_adapter = served.adapter is not None or not served.target.is_adapter
            return complete(served.target, prompt, ids, sampling, on_text, use_adapter=use_adapter)
