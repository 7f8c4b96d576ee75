"""vLLM: whether an adapter serves as is with vLLM's multi-LoRA serving, and `lora export --format vllm`.

vLLM loads PEFT adapters only under conditions of its own (vllm/lora: supported ranks, no DoRA, no
modules_to_save, bias "none", LoRA on the decoder's linear layers). `vllm_readiness` checks them on an
adapter_config.json (or the recipe's lora section) without importing anything, so train's summary and model card
can say it; an adapter that fails them still serves once merged, which `--format vllm` does and verifies.
"""

from dataclasses import dataclass, field

from lora_cli.errors import LoraError

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The decoder projections vLLM's LoRA layers wrap across the families lora trains (fused ones included).
VLLM_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                "gate_up_proj"}


@dataclass
class Readiness:
    ready: bool
    reasons: list[str] = field(default_factory=list)  # why not, one fact each
    fixes: list[str] = field(default_factory=list)  # the recipe changes that would make it ready

    def summary(self) -> str:
        if self.ready:
            return "serves on vLLM as is (vllm serve BASE --enable-lora --lora-modules NAME=ADAPTER)"
        return ("does not serve on vLLM as a LoRA: " + "; ".join(self.reasons)
                + ". Merge it (lora export ADAPTER OUT --format vllm) or change the recipe: " + "; ".join(self.fixes))


def vllm_readiness(adapter_config: dict) -> Readiness:
    """The facts vLLM checks before loading a LoRA adapter, from adapter_config.json's fields."""
    result = Readiness(True)

    def fail(reason: str, fix: str) -> None:
        result.ready = False
        result.reasons.append(reason)
        result.fixes.append(fix)

    rank = adapter_config.get("r")
    ranks = {rank, *(adapter_config.get("rank_pattern") or {}).values()} - {None}
    if bad := sorted(r for r in ranks if r not in VLLM_RANKS):
        nearest = min(VLLM_RANKS, key=lambda r: abs(r - bad[0]))
        fail(f"rank {', '.join(map(str, bad))} is not one of vLLM's ({', '.join(map(str, VLLM_RANKS))})",
             f"lora.r: {nearest}")
    if adapter_config.get("use_dora"):
        fail("DoRA adapters are not served by vLLM", "lora.use_dora: false")
    if adapter_config.get("modules_to_save"):
        fail(f"modules_to_save ({', '.join(adapter_config['modules_to_save'])}) trains full copies of layers, "
             "which vLLM does not load", "remove lora.modules_to_save")
    if adapter_config.get("bias", "none") != "none":
        fail(f"bias '{adapter_config['bias']}' trains biases, which vLLM does not load", "lora.bias: none")
    targets = adapter_config.get("target_modules")
    if isinstance(targets, str):  # a regex or all-linear: PEFT resolves all-linear to the projections
        targets = [] if targets == "all-linear" else [targets]
    if unknown := sorted({t.rsplit(".", 1)[-1] for t in targets or ()} - VLLM_MODULES):
        fail(f"target modules {', '.join(unknown)} are not layers vLLM applies LoRA to",
             "lora.target_modules: all-linear (or a list of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
             "down_proj)")
    return result


def recipe_readiness(lora) -> Readiness:
    """vllm_readiness for a recipe's lora section (what train writes as adapter_config.json)."""
    return vllm_readiness({"r": lora.r, "use_dora": lora.use_dora, "modules_to_save": lora.modules_to_save,
                           "bias": lora.bias, "target_modules": lora.target_modules or []})


def folder_readiness(folder) -> Readiness:
    """vllm_readiness for the adapter_config.json in FOLDER."""
    import json
    from pathlib import Path

    return vllm_readiness(json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8")))


def export_vllm(source, out, verify: bool, force: bool, progress):
    """The merged model (verified by lora merge) as OUT, with the readiness facts and the command lines."""
    from lora_cli.export import ExportResult
    from lora_cli.merge import merge_adapter

    result = ExportResult(out, "vllm", None, source.name)
    if source.kind != "adapter":
        raise LoraError(f"--format vllm merges an adapter for vLLM, and '{source.name}' is already a model: vLLM "
                        f"serves it as is (vllm serve {source.name}).")
    merged = merge_adapter(source.folder, out, base=source.base, verify=verify, force=force, progress=progress)
    result.merge, result.verified = merged, verify
    result.source = f"{source.name} merged into {merged.base} ({merged.weights})"
    result.files, result.size_bytes = merged.files, merged.size_bytes
    readiness = folder_readiness(source.folder)
    if merged.max_logit_diff is not None:
        result.report.append(f"verify:    largest logit difference from the unmerged adapter "
                             f"{merged.max_logit_diff:.3g} (tolerance {merged.tolerance:g} in {merged.dtype})")
    result.report.append(f"EOS:       {merged.eos}")
    result.report.append(f"adapter:   {readiness.summary()}")
    result.notes.append(f"Serve it: vllm serve {out} --served-model-name {source.stem}")
    if readiness.ready:
        result.notes.append(f"Or the adapter on its base: vllm serve {merged.base} --enable-lora "
                            f"--lora-modules {source.stem}={source.folder.resolve()} --max-lora-rank "
                            f"{_max_rank(source.folder)}")
    return result


def _max_rank(folder) -> int:
    import json

    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    ranks = [config.get("r") or 8, *(config.get("rank_pattern") or {}).values()]
    return min(r for r in VLLM_RANKS if r >= max(ranks))

