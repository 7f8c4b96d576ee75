"""Speed and memory of `lora train` against the plain Hugging Face stack, on a real architecture with random weights.

Runs on a GPU machine (no downloads: the model is built from its config, the data is random token ids):

    python benchmarks/speed.py --modes baseline_qlora,qlora,lora --results benchmarks/results

Each mode runs in its own process. `baseline_*` modes are the plain stack exactly as in the tutorials
(transformers + PEFT + TRL SFTTrainer defaults, SDPA, gradient checkpointing); the other modes call
`lora_cli.train.train`, the function behind `lora train`, with the recipe a user would write. Steps 5-14
are timed (CUDA events, so the host may run ahead as in a real run); tokens/s counts real (non-padding) tokens; peak is
torch.cuda.max_memory_allocated from the start of training. Each mode's figures become a row of the results table
(benchmarks/results_table.py: --results DIR appends to DIR/results.csv), a `lora` mode's beside the baseline of the
same data measured in the same run, with the losses logged at steps 5 and 10 (same data and seed: a lever that
changes training shows there). The commit is the checkout's, or BENCH_COMMIT where the code was copied without git.

Modes: baseline_qlora, baseline_lora, baseline_qlora_varied (the plain stack); qlora, lora, qlora_varied (lora
train's defaults; _varied packs chat-like lengths); qlora_documents (packs long documents, a quarter of the length
typical: the varlen path at long max_length, beside qlora's fixed rows); lora_nogc, qlora_nogc, baseline_lora_nogc
(no gradient checkpointing);
qlora_unfused, qlora_nooffload, qlora_noliger, qlora_nographs, qlora_nolean, qlora_noattention, qlora_trlloss,
lora_trlloss, qlora_varied_novarlen, qlora_documents_novarlen, qlora_notiled, qlora_nogrouped (one default lever
off, LEVER_OFF); qlora_cudnn,
qlora_flex (speed.attention_kernel: cuDNN's SDPA, FlexAttention); baseline_qlora_compile, qlora_compile (each with
TRL's `torch_compile: true`); unsloth (with UNSLOTH_SITE naming its packages); dpo, baseline_dpo (QLoRA DPO on preference
pairs of SEQ tokens a side: `lora train` with method: dpo against TRL's DPOTrainer with PEFT as its docs write it);
grpo, baseline_grpo (QLoRA GRPO, GRPO_GENERATIONS completions of GRPO_COMPLETION tokens for each prompt, scored by
length_reward below: `lora train` with method: grpo against TRL's GRPOTrainer with PEFT; give them --timeout 600).
BENCH_PROFILE=1 prints where the GPU time of two steps goes; BENCH_MEMORY=1 what is allocated at the peak.

--arch picks the shape: llama-3.1-8b (the default), qwen3-8b (Qwen3's q/k norms), qwen3-30b-a3b (MoE, 128 experts, 24
of its 48 layers unless BENCH_LAYERS says otherwise; the row's notes say how many), tiny and tiny-moe (CPU smoke tests).
On an MoE shape both stacks train the experts too (lora.target_experts: true beside PEFT's own mapping of the baseline's
gate/up/down_proj to them).
--layers N (BENCH_LAYERS) builds N decoder layers of any shape.

Long sequences (docs/long-sequences.md): --seq-lens 32768,65536 runs every mode at each length, each in its own
process, one row each, with --batch-size and --steps (BENCH_SEQ_LEN, BENCH_BATCH_SIZE, BENCH_STEPS for one length);
each row has the process's peak host memory and an outcome: ok, gpu_oom (CUDA out of memory), host_oom (killed by
SIGKILL: the kernel's out-of-memory killer), refused (lora train's memory check), timeout or failed.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_table import TABLE, append_rows, current_commit, gpu_tag, run_id

SEQ, BATCH = int(os.environ.get("BENCH_SEQ_LEN", 2048)), int(os.environ.get("BENCH_BATCH_SIZE", 2))
STEPS = int(os.environ.get("BENCH_STEPS", 14))
WARM = min(4, STEPS - 1)  # steps before the timed ones; with one step (a long sequence's minutes), that step is timed
LAYERS = int(os.environ.get("BENCH_LAYERS", 0))  # the architecture cut to this many decoder layers (0: all)
# BENCH_PROFILE=1: print where two steps' GPU time goes (steps WARM+1, WARM+2), with the host calls around each
# idle gap; =cuda: GPU activity only, which leaves the host's speed as it is (the host-side profiler slows it).
PROFILE = os.environ.get("BENCH_PROFILE") in ("1", "cuda")
# BENCH_MEMORY=1: record allocations from the start of training to step WARM+2 (or the last) and print the live ones
# at the peak, by where they were allocated (slows the run: not for timing).
MEMORY = os.environ.get("BENCH_MEMORY") == "1"
TRACE_DIR = os.environ.get("BENCH_TRACE_DIR")  # with BENCH_PROFILE: also keep each mode's trace there, gzipped
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
_QWEN3 = dict(model_type="qwen3", head_dim=128, vocab_size=151936, max_position_embeddings=8192, rope_theta=1e6,
              rms_norm_eps=1e-6, tie_word_embeddings=False)
# Each shape is its published config (architectures.py has the same entries); `layers` (BENCH_LAYERS overrides) fewer
# than the model's, where its weights would not fit the GPU beside the step, and the row's notes say so.
ARCHS = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=4096),  # a CPU smoke test
    "tiny-moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=49152, num_experts=8,
                     num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=4096),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8),
    # 48 layers of bf16 experts are 57 GiB (bitsandbytes quantizes linear layers only, so QLoRA keeps them too):
    # 24 layers leave the step room on an 80 GiB GPU.
    "qwen3-30b-a3b": dict(_QWEN3, model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                          num_hidden_layers=48, layers=24, num_attention_heads=32, num_key_value_heads=4,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
}
PREFERENCE_MODES, RL_MODES = ("dpo", "baseline_dpo"), ("grpo", "baseline_grpo")
GRPO_PROMPT, GRPO_COMPLETION, GRPO_GENERATIONS = 256, int(os.environ.get("BENCH_GRPO_COMPLETION", 128)), 8


def arch_config(arch: str):
    """The transformers config of an --arch, with the layers the run builds."""
    from transformers import AutoConfig

    shape = dict(ARCHS[arch])
    published = shape["num_hidden_layers"]
    shape["num_hidden_layers"] = int(LAYERS or shape.pop("layers", published))
    shape.pop("layers", None)
    return AutoConfig.for_model(shape.pop("model_type"), **shape), published


def arch_notes(arch: str) -> str:
    config, published = arch_config(arch)
    built = config.num_hidden_layers
    return f"{built} of the model's {published} layers" if built != published else ""


def is_moe(arch: str) -> bool:
    return "num_experts" in ARCHS[arch]


def matmul_params(arch: str) -> float:
    """Non-embedding matmul parameters a token goes through, lm_head included (the routed experts: top-k of them)."""
    import torch
    from transformers import AutoModelForCausalLM

    config, _ = arch_config(arch)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    experts = sum(p.numel() for p in model.parameters() if p.dim() == 3)
    share = getattr(config, "num_experts_per_tok", 1) / getattr(config, "num_experts", 1) if experts else 0
    return linear + experts * share


PEAK_FLOPS = 989e12  # H100/H200 dense bf16
WORK = Path(tempfile.gettempdir()) / "lora-bench"
REPO = Path(__file__).resolve().parent.parent


def build_model(arch: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, _ = arch_config(arch)
    path = WORK / f"{arch}-{config.num_hidden_layers}"
    if (path / "config.json").is_file():
        return path
    started = time.time()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(os.environ.get("TOKENIZER_DIR", REPO / ".gpu" / "tokenizer")).save_pretrained(path)
    print(f"built {arch} with random weights in {time.time() - started:.0f} s", flush=True)
    return path


def write_data(kind: str) -> Path:
    """fixed: rows of exactly SEQ tokens; varied: 4,000 chat-like lengths, log-normal, median ~300, 30..SEQ;
    documents: long documents, log-normal, median SEQ / 4, SEQ / 64..SEQ, enough to pack the steps' rows.
    preference: pairs of random text (a quarter of SEQ tokens of prompt, chosen and rejected of SEQ each, cut to SEQ
    by max_length, so every sequence has SEQ tokens); prompts: GRPO's prompts of about GRPO_PROMPT tokens.
    The file's name has the length, batch size and steps it was written for."""
    import numpy as np

    path = WORK / f"{kind}-{SEQ}x{BATCH}-{STEPS}.jsonl"
    if path.is_file():
        return path
    rng = np.random.default_rng(0)
    if kind in ("preference", "prompts"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.environ.get("TOKENIZER_DIR", REPO / ".gpu" / "tokenizer"))

        def text(n):  # random ids as text: the trainers tokenize text themselves
            return tokenizer.decode(rng.integers(1000, 30000, size=n).tolist())

        with path.open("w") as handle:
            for _ in range(BATCH * (STEPS + 1) if kind == "preference" else STEPS + 1):
                row = ({"prompt": text(SEQ // 4), "chosen": text(SEQ), "rejected": text(SEQ)} if kind == "preference"
                       else {"prompt": text(GRPO_PROMPT)})
                handle.write(json.dumps(row) + "\n")
        return path
    if kind == "fixed":
        lengths = [SEQ] * (BATCH * (STEPS + 1))
    elif kind == "documents":
        lengths = []
        while sum(lengths) < 1.5 * BATCH * SEQ * (STEPS + 1):
            lengths.append(int(np.clip(rng.lognormal(mean=np.log(SEQ / 4), sigma=0.8), SEQ // 64, SEQ)))
    else:
        lengths = np.clip(rng.lognormal(mean=np.log(300), sigma=0.9, size=4000), 30, SEQ).astype(int).tolist()
    with path.open("w") as handle:
        for n in lengths:
            handle.write(json.dumps({"input_ids": rng.integers(100, 40000, size=n).tolist()}) + "\n")
    return path


TOKENS_SEEN: list = []  # the running count of real tokens, a device tensor (count_tokens_on_device)


class GpuSampler:
    """The GPU's power draw and SM clock over the timed steps, from nvidia-smi every 100 ms.

    Why: an H200 running our QLoRA step sits at its 700 W cap with the SM clock at 1,400-1,700 MHz, while the plain
    stack, paced by the host, draws about 560 W at 1,900-1,980 MHz (benchmarks/results/2026-12-04-h200-power-*.csv):
    the same matmuls run 7-13% slower in our step than alone on a cool GPU (benchmarks/matmul_layouts.py). With
    these in each row a run says whether the GPU or the host set its pace."""

    def __init__(self):
        self.process = None
        self.means: dict = {}

    def start(self) -> None:
        import torch

        try:
            device = f"GPU-{torch.cuda.get_device_properties(0).uuid}"
            self.process = subprocess.Popen(
                ["nvidia-smi", "-i", device, "--query-gpu=power.draw,clocks.sm", "--format=csv,noheader,nounits",
                 "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except (OSError, AttributeError):  # no nvidia-smi, or a torch without device uuids: no figures
            self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        samples = []
        for line in self.process.communicate()[0].splitlines():
            try:
                samples.append([float(value) for value in line.split(",")])
            except ValueError:
                continue
        if samples:
            self.means = {"gpu_power_w": round(sum(s[0] for s in samples) / len(samples)),
                          "gpu_sm_clock_mhz": round(sum(s[1] for s in samples) / len(samples))}


GPU_SAMPLER = GpuSampler()


def count_tokens_on_device() -> None:
    """The Trainer's include_num_input_tokens_seen reads its count back after every step (`.item()`): a device sync
    that leaves the GPU idle while the host clips, steps the optimizer and loads the next batch (the QLoRA GPU
    timeline, BENCH_PROFILE=cuda, had idle gaps of 10-14 ms after host syncs), and the Unsloth run does not count
    that way. So every mode here counts the same real tokens (the attention mask, else the non-padding ids) on the
    device, read once at the end."""
    from transformers import Trainer

    def track(self, inputs):
        if self.args.include_num_input_tokens_seen == "no":  # GRPO: GRPOTrainer counts prompt and completion tokens
            return
        mask = inputs.get("attention_mask")
        count = mask.sum() if mask is not None else (inputs["input_ids"] != self.processing_class.pad_token_id).sum()
        TOKENS_SEEN[:] = [count if not TOKENS_SEEN else TOKENS_SEEN[0] + count]

    Trainer._track_num_input_tokens = track


def timer_callback(records: list, losses: list, graph_pools: list | None = None):
    import torch
    from transformers import TrainerCallback

    count_tokens_on_device()

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
                if MEMORY:
                    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")

        def on_step_begin(self, args, state, control, **kwargs):
            if WARM == 0 and not records:  # the one step is timed from its start
                records.append((stamp_now(), 0))
            if PROFILE and state.global_step == WARM:
                activities = [] if os.environ["BENCH_PROFILE"] == "cuda" else [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            # A CUDA event, not a sync: a sync a step would keep the host from running ahead of the GPU, which is
            # what a run without this timer does.
            records.append((stamp_now(), TOKENS_SEEN[0] if TOKENS_SEEN else state.num_input_tokens_seen))
            if torch.cuda.is_available() and state.global_step == WARM:
                GPU_SAMPLER.start()
            if state.global_step == STEPS:
                GPU_SAMPLER.stop()
            if graph_pools is not None and state.global_step == STEPS and torch.cuda.is_available():
                graph_pools.append(sum(segment["total_size"] for segment in torch.cuda.memory_snapshot()
                                       if tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0)))
            if PROFILE and state.global_step == WARM + 2:
                self.profiler.__exit__(None, None, None)
                print_profile(self.profiler)
            if MEMORY and state.global_step == min(WARM + 2, STEPS):
                print_memory_peak(torch.cuda.memory._snapshot())
                torch.cuda.memory._record_memory_history(enabled=None)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(round(float(logs["loss"]), 5))

    return StepTimer()


def stamp_now():
    """A CUDA event recorded now (no sync), or the time on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return time.time()
    stamp = torch.cuda.Event(enable_timing=True)
    stamp.record()
    return stamp


def print_profile(profiler) -> None:
    """Where two steps' time goes: the busiest kernels, how much of the time the GPU computes at all, and the
    longest idle gaps with the host calls that ran across them (a sync, an allocation, Python launching)."""
    import torch

    gpu = torch.cuda.is_available()
    table = profiler.key_averages().table(sort_by="self_cuda_time_total" if gpu else "self_cpu_time_total",
                                          row_limit=30, max_name_column_width=80)
    lines = table.splitlines()
    trace = Path(tempfile.mkdtemp()) / "trace.json"
    profiler.export_chrome_trace(str(trace))
    if TRACE_DIR:
        import gzip

        Path(TRACE_DIR).mkdir(parents=True, exist_ok=True)
        (Path(TRACE_DIR) / f"trace-{sys.argv[-1]}.json.gz").write_bytes(gzip.compress(trace.read_bytes()))
    events = json.loads(trace.read_text())["traceEvents"]
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                     if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    runtime = [e for e in events if e.get("cat") == "cuda_runtime" and e.get("dur", 0) > 200]
    if kernels:
        span = kernels[-1][1] - kernels[0][0]
        busy, gaps = covered(kernels)
        computing, _ = covered([k for k in kernels if not k[2].startswith(("Memcpy HtoD", "Memcpy DtoH"))])
        lines.append(f"GPU busy {busy / 1e3:.0f} ms of {span / 1e3:.0f} ms ({busy / span:.0%}), computing "
                     f"{computing / 1e3:.0f} ms ({computing / span:.0%}); {len(gaps)} idle gaps, "
                     f"{sum(g[0] for g in gaps) / 1e3:.0f} ms in all")
        for length, at, name in sorted(gaps, reverse=True)[:12]:
            calls = sorted({e["name"] for e in runtime if e["ts"] < at + length and e["ts"] + e["dur"] > at})
            lines.append(f"  gap {length / 1e3:.2f} ms before {name[:60]}; host calls: {', '.join(calls)[:150]}")
    print("\n".join("PROFILE " + line for line in lines), flush=True)


def covered(spans) -> tuple[float, list]:
    """The time sorted (begin, end, name) spans cover, and the gaps between them (length, start, name after)."""
    busy, end, gaps = 0.0, spans[0][0], []
    for begin, finish, name in spans:
        if begin > end:
            gaps.append((begin - end, end, name))
        busy += max(0.0, finish - max(begin, end))
        end = max(end, finish)
    return busy, gaps


def print_memory_peak(snapshot: dict) -> None:
    """Replay the recorded allocations, find the moment the most was allocated, and print the blocks alive then,
    summed by the first frame of ours or of the libraries that allocated them."""
    import torch

    live, total, peak, peak_live = {}, 0, -1, {}
    for event in snapshot["device_traces"][0]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
        if total > peak:
            peak, peak_live = total, dict(live)
    # Blocks allocated before recording began (weights, optimizer state) are not in the trace: add them.
    recorded_then = sum(block["size"] for block in live.values())
    before = torch.cuda.memory_allocated() - recorded_then
    by_site: dict = {}
    for block in peak_live.values():
        frames = [f for f in block.get("frames", []) if "torch/" not in f["filename"] or "autograd" in f["filename"]]
        site = next((f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames), "?")
        by_site[site] = by_site.get(site, 0) + block["size"]
    lines = [f"peak of recorded allocations {peak / 2**30:.2f} GiB, plus {before / 2**30:.2f} GiB allocated before "
             f"recording began (now alive)"]
    for site, size in sorted(by_site.items(), key=lambda item: -item[1])[:25]:
        lines.append(f"  {size / 2**20:9.1f} MiB  {site}")
    print("\n".join("MEMORY " + line for line in lines), flush=True)


def measure(records, losses, trainable: int, arch: str, batch_size: int, graph_pools=()) -> dict:
    import torch

    first = max(WARM - 1, 0)  # the end of the last untimed step, or the start of the one step
    (t0, n0), (t1, n1) = records[first], records[-1]
    if isinstance(t0, float):
        seconds = t1 - t0
    else:
        torch.cuda.synchronize()
        seconds = t0.elapsed_time(t1) / 1e3
    tokens_per_second = int(n1 - n0) / seconds
    flops_per_token = 4 * matmul_params(arch) + 6 * trainable
    return {
        "tokens_per_second": round(tokens_per_second),
        "seconds_per_step": round(seconds / (len(records) - 1 - first), 3),
        "seq_len": SEQ,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        # CUDA graphs' memory pool is reserved, not allocated, while they replay: reserved shows it.
        "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if torch.cuda.is_available() else None,
        "graph_pool_gib": round(graph_pools[-1] / 2**30, 2) if graph_pools else None,  # memory of CUDA graphs' pools
        "mfu": round(tokens_per_second * flops_per_token / PEAK_FLOPS, 4),
        "trainable": trainable,
        "batch_size": batch_size,
        "losses": losses,  # logged at steps 5 and 10: a lever that trains differently shows here (same data, seed)
        **GPU_SAMPLER.means,
    }


def training_settings(data_kind: str) -> dict:
    settings = {"max_steps": STEPS, "per_device_train_batch_size": BATCH, "learning_rate": 2e-4, "logging_steps": 5,
                "save_strategy": "no", "max_length": SEQ, "report_to": "none",
                "include_num_input_tokens_seen": "non_padding"}
    if data_kind == "varied":
        settings["per_device_train_batch_size"] = 8  # the tutorials' padded batches of 8
    if data_kind == "preference":
        settings["learning_rate"] = 5e-5
    if data_kind == "prompts":  # one prompt's group a step; GRPOTrainer counts its tokens itself (prompt + completion)
        del settings["max_length"]
        settings.update(per_device_train_batch_size=GRPO_GENERATIONS, num_generations=GRPO_GENERATIONS,
                        max_completion_length=GRPO_COMPLETION, learning_rate=1e-5, include_num_input_tokens_seen="no")
    return settings


def data_kind_of(mode: str) -> str:
    if mode in PREFERENCE_MODES:
        return "preference"
    if mode in RL_MODES:
        return "prompts"
    return next((kind for kind in ("varied", "documents") if kind in mode), "fixed")


def length_reward(completions, **kwargs) -> list[float]:
    """GRPO's reward in the benchmark, the same for both sides: completions near 200 characters score best."""
    return [-abs(len(c if isinstance(c, str) else c[0]["content"]) - 200) / 200 for c in completions]


LEVER_OFF = {"_unfused": {"fused_lora": False}, "_nooffload": {"offload_activations": False},
             "_novarlen": {"varlen_attention": False}, "_nographs": {"cuda_graphs": False},
             "_nolean": {"lean_recompute": False}, "_noattention": {"offload_attention": False},
             "_trlloss": {"fused_loss": False}, "_notiled": {"tiled_mlp": False},
             "_nogrouped": {"grouped_experts": False}}


def run_lora(mode: str, arch: str) -> dict:
    """`lora train`'s own code path, with the recipe a user would write for this mode."""
    from safetensors.torch import load_file

    from lora_cli.recipe import build_recipe
    from lora_cli.train import train

    data_kind = data_kind_of(mode)
    training = training_settings(data_kind)
    if data_kind in ("varied", "documents"):
        training.update(per_device_train_batch_size=BATCH, packing=True)  # packed rows of SEQ tokens, padding-free
    raw = {
        "model": {"name_or_path": str(build_model(arch)), "attn_implementation": "sdpa"},
        # On an MoE shape the baseline's TARGETS reach the experts (PEFT moves gate/up/down_proj to them): ours too.
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_experts": is_moe(arch),
                 "target_modules": [t for t in TARGETS if not (is_moe(arch) and t in MLP_NAMES)]},
        "data": {"train": str(write_data(data_kind))},
        "training": training,
        "output_dir": str(WORK / f"out-{mode}"),
    }
    if mode in PREFERENCE_MODES + RL_MODES:
        raw["method"] = mode
    if mode in RL_MODES:
        raw["rewards"] = [f"{Path(__file__).resolve()}:length_reward"]
    if "qlora" in mode or mode in PREFERENCE_MODES + RL_MODES:
        raw["quantization"] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    if mode.endswith("_nogc"):  # no recomputation: as a recipe with memory to spare may set it
        raw["training"]["gradient_checkpointing"] = False
    # One lever off at a time, to measure what each pays (recipe keys, as a user would turn them off).
    for suffix, speed in LEVER_OFF.items():
        if mode.endswith(suffix):
            raw["speed"] = speed
    if mode.endswith("_noliger"):
        raw["training"]["use_liger_kernel"] = False
    if mode.endswith(("_cudnn", "_flex")):  # an attention kernel instead of SDPA's flash (docs/long-sequences.md)
        raw["speed"] = {"attention_kernel": mode.rpartition("_")[2]}
    if mode.endswith("_compile"):  # not a lever of ours: TRL's torch.compile on top of the defaults
        raw["training"]["torch_compile"] = True
    records, losses, graph_pools = [], [], []
    summary = train(build_recipe(raw, source=f"bench-{mode}"), overwrite=True,
                    callbacks=[timer_callback(records, losses, graph_pools)])
    adapter = load_file(Path(raw["output_dir"]) / "adapter_model.safetensors")
    trainable = sum(t.numel() for t in adapter.values())
    return {**measure(records, losses, trainable, arch, training["per_device_train_batch_size"], graph_pools),
            "steps": summary["steps"]}


def run_baseline(mode: str, arch: str) -> dict:
    """The plain stack as the tutorials write it: the model loaded by transformers (quantized for QLoRA), PEFT's
    LoraConfig, TRL's SFTTrainer (DPOTrainer, GRPOTrainer) with its defaults; peak memory counted from the start of
    training."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    path = build_model(arch)
    data_kind = data_kind_of(mode)
    kwargs = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    if "qlora" in mode or mode in PREFERENCE_MODES + RL_MODES:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(path, device_map={"": 0 if gpu else "cpu"}, **kwargs)
    rows = [json.loads(line) for line in write_data(data_kind).read_text().splitlines()]
    records, losses = [], []
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    common = dict(model=model, train_dataset=Dataset.from_list(rows), peft_config=peft_config,
                  processing_class=AutoTokenizer.from_pretrained(path), callbacks=[timer_callback(records, losses)])
    output = dict(output_dir=str(WORK / f"out-{mode}"), bf16=gpu, use_cpu=not gpu, dataloader_num_workers=0,
                  **training_settings(data_kind))
    if mode == "baseline_dpo":
        args = DPOConfig(**output)
        trainer = DPOTrainer(args=args, **common)
    elif mode == "baseline_grpo":
        args = GRPOConfig(**output)
        trainer = GRPOTrainer(args=args, reward_funcs=[length_reward], **common)
    else:
        args = SFTConfig(gradient_checkpointing="nogc" not in mode, torch_compile=mode.endswith("_compile"),
                         packing=False, **output)
        trainer = SFTTrainer(args=args, **common)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    return measure(records, losses, trainable, arch, args.per_device_train_batch_size)


def run_unsloth(arch: str) -> dict:
    """Unsloth's QLoRA as its docs write it (FastLanguageModel with its own gradient checkpointing), on the same model
    and data."""
    import torch
    from unsloth import FastLanguageModel  # first: it patches transformers and TRL on import

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    path = build_model(arch)
    model, tokenizer = FastLanguageModel.from_pretrained(str(path), max_seq_length=SEQ, load_in_4bit=True,
                                                         dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, target_modules=TARGETS,
                                             use_gradient_checkpointing="unsloth", bias="none")
    rows = [json.loads(line) for line in write_data("fixed").read_text().splitlines()]
    records, losses = [], []
    settings = {k: v for k, v in training_settings("fixed").items() if k != "include_num_input_tokens_seen"}
    args = SFTConfig(output_dir=str(WORK / "out-unsloth"), bf16=True, packing=False, **settings)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[timer_callback(records, losses)])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    # Unsloth may change gradient accumulation on its own: count the tokens it really processed.
    tokens_per_step = BATCH * SEQ * trainer.args.gradient_accumulation_steps
    records = [(t, i * tokens_per_step) for i, (t, _) in enumerate(records, start=1)]
    return measure(records, losses, trainable, arch, BATCH)


def run_mode(mode: str, arch: str) -> None:
    if mode == "build":
        build_model(arch)
        return
    if mode == "unsloth":
        result = run_unsloth(arch)
    else:
        result = run_baseline(mode, arch) if mode.startswith("baseline_") else run_lora(mode, arch)
    print("RESULT " + json.dumps({"mode": mode, **result}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="baseline_qlora,qlora,lora")
    parser.add_argument("--arch", default="llama-3.1-8b", choices=sorted(ARCHS))
    parser.add_argument("--results", default=str(TABLE.parent), help="folder of the results.csv the rows go to")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per mode")
    parser.add_argument("--seq-lens", help="comma-separated sequence lengths, each mode at each (BENCH_SEQ_LEN: one)")
    parser.add_argument("--batch-size", type=int, help="sequences a step (BENCH_BATCH_SIZE; default 2)")
    parser.add_argument("--steps", type=int, help="steps a mode runs, the first min(4, steps - 1) untimed "
                                                   "(BENCH_STEPS; default 14; 1: that step timed)")
    parser.add_argument("--layers", type=int, help="the architecture cut to this many decoder layers (BENCH_LAYERS)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_mode(args.one, args.arch)
        return
    import torch

    settings = {"BENCH_BATCH_SIZE": args.batch_size, "BENCH_STEPS": args.steps, "BENCH_LAYERS": args.layers}
    env = {**os.environ, **{key: str(value) for key, value in settings.items() if value is not None}}
    if int(env.get("BENCH_STEPS", STEPS)) < 1:
        sys.exit("--steps: at least 1")
    # Built in a process of its own: this one must not hold GPU memory while the modes measure theirs.
    subprocess.run([sys.executable, __file__, "--arch", args.arch, "--one", "build"], check=True, env=env)
    lengths = [int(n) for n in args.seq_lens.split(",")] if args.seq_lens else [SEQ]
    results = {}
    for length in lengths:
        for mode in args.modes.split(","):
            mode_env = {"CUDA_VISIBLE_DEVICES": "0", **env, "BENCH_SEQ_LEN": str(length)}  # one process, one GPU
            if mode == "unsloth" and os.environ.get("UNSLOTH_SITE"):
                # Unsloth pins older TRL and datasets: its own packages come first, in its own process.
                mode_env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ["UNSLOTH_SITE"],
                                                                       env.get("PYTHONPATH")]))
            results[(length, mode)] = run_process(mode, length, args, mode_env)
    write_rows(results, args, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")


def run_process(mode: str, length: int, args, env: dict) -> dict:
    """One mode at one length in a process of its own: its result, or the outcome that ended it, with its peak host
    memory (read every half second, so that a process the kernel kills has one too)."""
    label = f"{mode}@{length}"
    proc = subprocess.Popen([sys.executable, __file__, "--arch", args.arch, "--one", mode], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watch = HostMemoryWatch(proc.pid)
    watch.start()
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        timed_out = True
    watch.stop()
    for line in stdout.splitlines():
        if line.startswith(("precision and speed:", "trainable params:", "memory plan", "PROFILE ", "MEMORY ")):
            print(f"{label:>22}  {line}")
    host = {"peak_host_gib": watch.peak_gib("VmHWM"), "pinned_host_gib": watch.peak_gib("VmPin")}
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if lines and proc.returncode == 0:
        result = {**json.loads(lines[-1][7:]), **host, "outcome": "ok", "notes": lever_line(stdout)}
        print(f"{label:>22}: {result}", flush=True)
        return result
    outcome, note = failure(proc.returncode, stdout + stderr, timed_out, args.timeout)
    print(f"{label:>22}: {outcome} (rc {proc.returncode}) {note}\n{(stdout + stderr)[-3000:]}", flush=True)
    return {"mode": mode, "seq_len": length, "batch_size": int(env.get("BENCH_BATCH_SIZE", BATCH)), **host,
            "outcome": outcome, "notes": note}


def failure(returncode: int, output: str, timed_out: bool, timeout: int) -> tuple[str, str]:
    """How a mode's process ended without a result: the outcome column's value and a note."""
    errors = [line for line in output.splitlines() if "Error" in line or line.startswith("error:")]
    last = errors[-1].strip()[:300] if errors else ""
    if timed_out:
        return "timeout", f"killed after {timeout} s"
    if "out of memory" in output and ("CUDA" in output or "OutOfMemoryError" in output):
        return "gpu_oom", last
    if returncode == -9:
        return "host_oom", "killed by SIGKILL (the kernel's out-of-memory killer)"
    if "LoraError" in output:
        return "refused", last.partition("LoraError: ")[2] or last
    return "failed", last


def lever_line(stdout: str) -> str:
    """The levers lora train chose (its `precision and speed:` line), for the row's notes."""
    line = next((line for line in stdout.splitlines() if line.startswith("precision and speed:")), "")
    return line.partition(" packing=")[2].partition(" ")[2]


class HostMemoryWatch:
    """A process's peak resident memory (VmHWM) and pinned memory (VmPin, where the driver accounts it), read from
    /proc every half second on a thread."""

    def __init__(self, pid: int):
        import threading

        self.pid, self.peaks, self.done = pid, {}, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    name, _, value = line.partition(":")
                    if name in ("VmHWM", "VmPin"):
                        self.peaks[name] = max(self.peaks.get(name, 0), int(value.split()[0]) * 1024)
            except (OSError, ValueError, IndexError):
                pass
            self.done.wait(0.5)

    def peak_gib(self, name: str) -> float | None:
        value = self.peaks.get(name)
        return round(value / 2**30, 2) if value else None


MEASURED = ("tokens_per_second", "peak_gib", "reserved_gib", "graph_pool_gib", "mfu", "losses", "gpu_power_w",
            "gpu_sm_clock_mhz", "peak_host_gib", "pinned_host_gib", "seconds_per_step", "outcome", "notes")
# The mode a row is compared with, measured in the same run at the same length: the plain stack, except for packed
# long documents, whose comparison is lora train's own fixed-length rows (the varlen path's share of that rate).
BASELINE_OF = {"qlora_documents": "qlora", "qlora_documents_novarlen": "qlora", "dpo": "baseline_dpo",
               "grpo": "baseline_grpo"}


def write_rows(results: dict, args, gpu: str) -> None:
    """One row per measured mode and length; a `lora` mode's row and Unsloth's carry the baseline measured beside
    them."""
    table = Path(args.results) / "results.csv"
    date, commit = datetime.date.today().isoformat(), os.environ.get("BENCH_COMMIT") or current_commit()
    options = "".join(f" --{name.replace('_', '-')} {value}" for name, value in
                      (("seq_lens", args.seq_lens), ("batch_size", args.batch_size), ("steps", args.steps),
                       ("layers", args.layers)) if value is not None)
    run = {
        "run": run_id(date, gpu_tag(gpu), commit, TABLE, table), "date": date, "gpu": gpu_tag(gpu), "gpu_name": gpu,
        "num_gpus": 1, "commit": commit,
        "model": f"{args.arch}-{args.layers or LAYERS}layers" if args.layers or LAYERS else args.arch,
        # The plain stack is paced by the host: its speed moves with the host's processor.
        "host_cpu": host_cpu(), "host_python_loop_ms": host_loop_ms(),
        "command": f"python benchmarks/speed.py --modes {args.modes} --arch {args.arch}{options}",
        "notes": arch_notes(args.arch),
    }
    rows = []
    for (length, mode), result in results.items():
        data_kind = data_kind_of(mode)
        baseline_mode = BASELINE_OF.get(mode)
        if baseline_mode is None and not mode.startswith("baseline_"):
            method = "lora" if mode.startswith("lora") else "qlora"  # unsloth runs QLoRA
            baseline_mode = f"baseline_{method}{'_varied' if data_kind == 'varied' else ''}"
        baseline = results.get((length, baseline_mode), {}) if baseline_mode else {}
        rows.append({
            **run, "mode": mode, "data": data_kind, "seq_len": result.get("seq_len", length),
            "batch_size": result["batch_size"], **{key: result.get(key) for key in MEASURED},
            "baseline_mode": baseline_mode if baseline.get("tokens_per_second") else None,
            "baseline_tokens_per_second": baseline.get("tokens_per_second"),
            "baseline_peak_gib": baseline.get("peak_gib"),
        })
    if rows:
        append_rows(rows, table)


def host_loop_ms() -> float:
    """Milliseconds the host takes for a fixed pure-Python loop, the best of three: the plain stack's kernels are
    launched through Python, so its speed moves with the host's, which this shows (a virtual machine's processor
    model often does not)."""
    best = float("inf")
    for _ in range(3):
        started, total = time.perf_counter(), 0
        for i in range(2_000_000):
            total += i & 7
        best = min(best, time.perf_counter() - started)
    return round(best * 1e3, 1)


def host_cpu() -> str:
    """The host's processor model and core count, from /proc/cpuinfo (Linux); the core count alone elsewhere."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else 'unknown processor'}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
