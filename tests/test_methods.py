"""The methods beyond SFT on a tiny random Llama: each trains (LoRA and QLoRA), DPO-like methods raise the implicit
reward margin on held-out pairs, GRPO raises its reward, the data formats, the errors, kill -9 and --resume, and
merging the SFT -> DPO chain."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, error_line, run_cli, write_jsonl
from lora_cli.data import Rows
from lora_cli.errors import LoraError
from lora_cli.preference_data import convert, detect_format
from lora_cli.recipe import load_recipe
from lora_cli.train import newest_checkpoint, train

QUESTIONS = [f"What is {a} plus {b}?" for a in range(6) for b in range(4)]
PAIRS = [{"prompt": q, "chosen": " Arr arr arr!", "rejected": " The answer is a number."} for q in QUESTIONS]
HELD_OUT = [{"prompt": f"How much is {a} and {a}?", "chosen": " Arr arr arr!", "rejected": " The answer is a number."}
            for a in range(7, 11)]
FAST = {"gradient_checkpointing": False, "logging_steps": 1, "save_strategy": "no", "max_length": 64,
        "per_device_train_batch_size": 4}


def write_recipe(folder, model_dir, data, method, training=None, name=None, **top):
    path = folder / f"{name or method}.yaml"
    fast = {k: v for k, v in FAST.items() if not (method == "grpo" and k == "max_length")}  # GRPO: completion length
    raw = {"method": method, "model": {"name_or_path": str(model_dir)},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
           "data": {"train": str(data)}, "training": {**fast, **(training or {})},
           "output_dir": str(folder / f"out-{name or method}"), **top}
    path.write_text(yaml.safe_dump(raw))
    return path


def completion_logps(model, tokenizer, prompt: str, completion: str) -> float:
    """Sum of the completion's token log-probabilities after the prompt."""
    prompt_ids = tokenizer(prompt).input_ids
    ids = torch.tensor([prompt_ids + tokenizer(completion, add_special_tokens=False).input_ids])
    with torch.no_grad():
        logps = model(ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, 1:]
    return logps[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].sum().item()


def held_out_margin(adapter_dir, base_dir) -> float:
    """The implicit reward margin (per beta) on held-out pairs: how much more the adapter prefers chosen over
    rejected than the model without it does. 0 for an untrained (zero-initialised) adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()
    margins = []
    for pair in HELD_OUT:
        policy = [completion_logps(model, tokenizer, pair["prompt"], pair[side]) for side in ("chosen", "rejected")]
        with model.disable_adapter():
            reference = [completion_logps(model, tokenizer, pair["prompt"], pair[side]) for side in ("chosen", "rejected")]
        margins.append((policy[0] - reference[0]) - (policy[1] - reference[1]))
    return sum(margins) / len(margins)


@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo", "kto"])
def test_preference_methods_raise_the_held_out_margin(method, tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    if method == "kto":  # unpaired: each pair as a desirable and an undesirable completion
        data = write_jsonl(tmp_path / "unpaired.jsonl", [
            {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in PAIRS for side in ("chosen", "rejected")])
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama, data, method,
                                      {"max_steps": 12, "learning_rate": 3e-3, "num_train_epochs": 3}))
    summary = train(recipe)
    out = tmp_path / f"out-{method}"
    margin = held_out_margin(out, tiny_llama)
    print(f"\n{method}: held-out implicit reward margin {margin:.3f} after {summary['steps']} steps")
    assert margin > 1.0, margin
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["method"] == method
    card = (out / "README.md").read_text()
    assert f"| training method | {method.upper()} (TRL) |" in card and "final rewards/margins" in card
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margins" in record for record in logged)
    # Tokens a second from the trainer's running count (ORPO's and CPO's trainers keep none: methods/dpo.py counts)
    assert summary["tokens"] > 0 and summary["tokens_per_second"] > 0
    rates = [record["tokens_per_second"] for record in logged if "tokens_per_second" in record]
    assert rates and all(rate > 0 for rate in rates)
    report = json.loads((out / "data_audit.json").read_text())
    assert report["method"] == method and report["audited_examples"] == len(PAIRS) * (2 if method == "kto" else 1)


@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo", "kto", "grpo"])
def test_every_method_trains_with_qlora(method, tmp_path, tiny_llama):
    """NF4 base (bitsandbytes runs on the CPU), LoRA adapters trained and written."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS if method != "grpo" else
                       [{"prompt": p["prompt"], "answer": "7"} for p in PAIRS])
    training = {"max_steps": 2, "learning_rate": 1e-2}
    rewards = {}
    if method == "grpo":  # a reward that differs between completions, so the advantages (and gradients) are not 0
        training.update(num_generations=4, max_completion_length=6)
        (tmp_path / "parity.py").write_text("def first_token_parity(completion_ids, **kwargs):\n"
                                            "    return [float(ids[0] % 2) for ids in completion_ids]\n")
        rewards = {"rewards": ["exact_match", "parity.py:first_token_parity"]}
    path = write_recipe(tmp_path, tiny_llama, data, method, training, quantization={"load_in_4bit": True}, **rewards)
    summary = train(load_recipe(path))
    assert summary["steps"] == 2
    weights = load_file(tmp_path / f"out-{method}" / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and w.abs().max() > 0 for name, w in weights.items())
    assert json.loads((tmp_path / f"out-{method}" / "adapter_config.json").read_text())["r"] == 8


FAVOURITE_TOKEN_REWARD = '''
def favourite_token(completion_ids, target, **kwargs):
    """The share of the completion's tokens that are the row's `target` token id."""
    return [sum(t == goal for t in ids) / max(1, len(ids)) for ids, goal in zip(completion_ids, target)]
'''


def peaked_tiny_llama(folder, tokenizer_dir):
    """A tiny random Llama whose next-token distribution is peaked (embeddings of std 1, not 0.02), so a few tokens
    are sampled often enough for a reward to tell completions apart; the usual tiny model's is nearly uniform over
    49,152 tokens."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=1.0, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def test_grpo_raises_its_reward_on_a_learnable_task(tmp_path, tiny_llama):
    """The row's `target` column names a token the model samples in about a third of its completions; a user reward
    function pays for its share of the completion. GRPO's mean reward over the last steps beats the first."""
    model, tokenizer = peaked_tiny_llama(tmp_path / "peaked", tiny_llama)
    prompts = [p["prompt"] for p in PAIRS[:8]]
    torch.manual_seed(0)
    sampled = torch.cat([model.generate(tokenizer(p, return_tensors="pt").input_ids, do_sample=True, max_new_tokens=8,
                                        num_return_sequences=8, pad_token_id=tokenizer.pad_token_id)[:, -8:]
                         for p in prompts])
    # The token in the most nearly a third of the completions: some groups hold it and some do not, so the rewards
    # of a group differ (a token in every completion, or in none, gives every completion the same advantage, 0).
    present = torch.zeros(len(tokenizer))
    for completion in sampled:
        present[completion.unique()] += 1 / len(sampled)
    target = int((present - 1 / 3).abs().argmin())
    (tmp_path / "my_rewards.py").write_text(FAVOURITE_TOKEN_REWARD)
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "target": target} for p in prompts])
    path = write_recipe(tmp_path, tmp_path / "peaked", data, "grpo",
                        {"max_steps": 20, "learning_rate": 3e-2, "num_generations": 8, "per_device_train_batch_size": 8,
                         "max_completion_length": 8, "temperature": 1.0, "logging_steps": 1},
                        rewards=["my_rewards.py:favourite_token"])
    train(load_recipe(path))
    records = [json.loads(line) for line in (tmp_path / "out-grpo" / "metrics.jsonl").read_text().splitlines()]
    rewards = [record["reward"] for record in records if "reward" in record]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"\ngrpo: mean reward {first:.3f} over the first 5 steps, {last:.3f} over the last 5")
    assert last > first + 0.05 and last > 2 * first, rewards
    assert any("rewards/favourite_token/mean" in record for record in records)


def test_preference_formats_are_detected_and_converted(tmp_path):
    messages = [{"role": "user", "content": "Hi?"}]
    conversational = {"prompt": messages, "chosen": [{"role": "assistant", "content": "Ahoy!"}],
                      "rejected": [{"role": "assistant", "content": "Hello."}]}
    implicit = {"chosen": messages + [{"role": "assistant", "content": "Ahoy!"}],
                "rejected": messages + [{"role": "assistant", "content": "Hello."}]}
    for record in (PAIRS[0], conversational, implicit):
        rows = Rows([record], [1], "pairs.jsonl")
        assert detect_format(rows, "dpo") == "preference"
        (pair,) = convert(rows, "preference", "data.train")
        assert set(pair) == {"prompt", "chosen", "rejected"}
    assert convert(Rows([implicit], [1], "x"), "preference", "data.train")[0]["prompt"] == messages
    unpaired = Rows([{"prompt": "Hi?", "completion": "Ahoy!", "label": "true"}], [1], "kto.csv")
    assert detect_format(unpaired, "kto") == "unpaired"
    assert convert(unpaired, "unpaired", "data.train")[0]["label"] is True
    prompts = Rows([{"prompt": messages, "answer": "4", "difficulty": 2}], [1], "p.jsonl")
    assert convert(prompts, detect_format(prompts, "grpo"), "data.train") == [
        {"prompt": messages, "answer": "4", "difficulty": 2}]
    with pytest.raises(LoraError, match=r"line 3: 'label' must be true"):
        convert(Rows([{"prompt": "a", "completion": "b", "label": "maybe"}], [3], "k.jsonl"), "unpaired", "data.train")
    with pytest.raises(LoraError, match=r"columns \(prompt, response\).*method: dpo trains on preference pairs"):
        detect_format(Rows([{"prompt": "a", "response": "b"}], [1], "x.jsonl"), "dpo")
    with pytest.raises(LoraError, match="share no first message"):
        convert(Rows([{"chosen": [{"role": "assistant", "content": "a"}],
                       "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}],
                     [1], "x"), "preference", "data.train")


def recipe_error(tmp_path, capsys, raw: dict) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), **raw}, sort_keys=False))
    message = error_line(run_cli(["train", path], capsys))
    assert not (tmp_path / "out").exists(), "nothing is written for a bad recipe"
    return message


def test_recipe_errors_name_the_key_and_line(tmp_path, capsys, tiny_llama):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    base = {"model": {"name_or_path": str(tiny_llama)}, "data": {"train": str(data)}}
    message = recipe_error(tmp_path, capsys, {**base, "training": {"beta": 0.1}})
    assert "line 7: training.beta is a field of TRL's DPOConfig (method: dpo, orpo, simpo, kto" in message
    assert "Set method: dpo" in message
    message = recipe_error(tmp_path, capsys, {"method": "dpo", **base, "training": {"betta": 0.1}})
    assert "training.betta is not a field of TRL's DPOConfig. Did you mean 'beta'?" in message
    message = recipe_error(tmp_path, capsys, {"method": "grpo", **base})
    assert "line 2: method is grpo, which needs rewards" in message and "exact_match" in message
    message = recipe_error(tmp_path, capsys, {"method": "grpo", **base, "rewards": ["missing.py:score"]})
    assert "rewards names 'missing.py:score', but the Python file" in message and "does not exist" in message
    (tmp_path / "mine.py").write_text("def scores(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    message = recipe_error(tmp_path, capsys, {"method": "grpo", **base, "rewards": ["mine.py:score"]})
    assert "defines no function 'score'. Did you mean 'scores'?" in message
    message = recipe_error(tmp_path, capsys, {"method": "dpo", **base, "rewards": ["exact_match"]})
    assert "rewards is for method: grpo" in message
    message = recipe_error(tmp_path, capsys, {"method": "dpo", "model": {"name_or_path": str(tiny_llama),
                                                                          "adapter": "runs/never-trained"}})
    assert "model.adapter names the folder 'runs/never-trained', which does not exist" in message
    message = recipe_error(tmp_path, capsys, {"method": "grpo", **base, "rewards": ["exact_match"]})
    assert "exact_match compares each completion with the row's 'answer' column" in message
    message = recipe_error(tmp_path, capsys, {"method": "grpo", **base, "rewards": ["exact_match"],
                                              "training": {"num_generations": 3}})
    assert "training.num_generations is 3" in message and "multiple of num_generations" in message


def test_pairs_identical_after_truncation_are_refused(tmp_path, capsys, tiny_llama):
    """Chosen and rejected that differ only after max_length: every pair the same sequence to the trainer."""
    long_start = " ".join(["Arr"] * 40)
    data = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": p["prompt"], "chosen": f"{long_start} yes", "rejected": f"{long_start} no"} for p in PAIRS])
    path = write_recipe(tmp_path, tiny_llama, data, "dpo", {"max_length": 24})
    message = error_line(run_cli(["train", path], capsys))
    assert "No audited pair differs between its chosen and rejected completion" in message
    assert "truncation at training.max_length=24 cuts every pair" in message
    assert not (tmp_path / "out-dpo").exists()


def test_dpo_kill_9_then_resume_matches_the_straight_run(tmp_path, tiny_llama, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    training = {"max_steps": 4, "save_steps": 1, "save_strategy": "steps", "learning_rate": 5e-3}
    straight = write_recipe(tmp_path, tiny_llama, data, "dpo", training, name="straight")
    train(load_recipe(straight))
    expected = load_file(tmp_path / "out-straight" / "adapter_model.safetensors")

    killed = write_recipe(tmp_path, tiny_llama, data, "dpo", training, name="killed")
    out = tmp_path / "out-killed"
    process = subprocess.Popen([sys.executable, "-m", "lora_cli", "train", str(killed)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while newest_checkpoint(out) is None:
            assert process.poll() is None and time.time() < deadline
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (out / "adapter_config.json").exists(), "the kill landed after the run had finished"
    changed = write_recipe(tmp_path, tiny_llama, data, "dpo", {**training, "beta": 0.5}, name="killed")
    message = error_line(run_cli(["train", changed, "--resume"], capsys))
    assert "training.beta: (not set) -> 0.5" in message  # the same parity check as SFT, on DPO's own keys
    write_recipe(tmp_path, tiny_llama, data, "dpo", training, name="killed")
    resumed = run_cli(["train", killed, "--resume"], capsys)
    assert resumed.code == 0, resumed.err[-3000:]
    weights = load_file(out / "adapter_model.safetensors")
    assert max((weights[k] - expected[k]).abs().max().item() for k in expected) < 1e-4


def test_sft_then_dpo_merges_as_the_chain(tmp_path, tiny_llama, capsys):
    """DPO continues the SFT adapter (model.adapter), against it frozen as the reference; lora merge writes base +
    SFT + DPO, and generate --compare-base answers with the SFT adapter too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": "Arr, it be so."}]}
        for p in PAIRS])
    sft = write_recipe(tmp_path, tiny_llama, chats, "sft", {"max_steps": 3, "learning_rate": 1e-2})
    assert run_cli(["train", sft], capsys).code == 0
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    dpo_path = tmp_path / "dpo.yaml"
    dpo_path.write_text(yaml.safe_dump({
        "method": "dpo", "model": {"adapter": str(tmp_path / "out-sft")}, "lora": {"r": 8},
        "data": {"train": str(pairs)}, "training": {**FAST, "max_steps": 3, "learning_rate": 1e-2},
        "output_dir": str(tmp_path / "out-dpo")}))
    result = run_cli(["train", dpo_path], capsys)
    assert result.code == 0, result.err[-3000:]
    assert "continues the adapter" in result.out and "that adapter as loaded (frozen) as the reference" in result.out
    assert not (tmp_path / "out-dpo" / "ref").exists()  # TRL's reference copy is not part of the result

    message = recipe_error(tmp_path, capsys, {"method": "dpo", "model": {"adapter": str(tmp_path / "out-sft")},
                                              "lora": {"r": 4}, "data": {"train": str(pairs)}})
    assert "lora.r is 4, but model.adapter" in message and "has r=8" in message

    merged = tmp_path / "merged"
    result = run_cli(["merge", tmp_path / "out-dpo", merged], capsys)
    assert result.code == 0, result.err[-3000:]
    assert f"chain:   {tiny_llama} + {tmp_path / 'out-sft'} (sft) + {tmp_path / 'out-dpo'} (dpo)" in result.out
    ids = torch.tensor([[1, 42, 7, 99, 5]])
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
        chain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(tmp_path / "out-dpo"))
        sft_only = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(tmp_path / "out-sft"))
        assert (merged_logits - chain(ids).logits).abs().max() < 1e-3
        assert (merged_logits - sft_only(ids).logits).abs().max() > 1e-3  # DPO moved the SFT adapter on
        with sft_only.disable_adapter():
            assert (sft_only(ids).logits - merged_logits).abs().max() > 1e-3

    shown = run_cli(["generate", tmp_path / "out-dpo", "-p", "What is 1 plus 1?", "--max-new-tokens", "4",
                     "--compare-base", "--json"], capsys)
    assert shown.code == 0, shown.err[-3000:]
    row = json.loads(shown.out.strip().splitlines()[-1])
    assert row["start"]["adapter"] == str(tmp_path / "out-sft") and "completion" in row["base"]


def test_inspect_params_plans_the_methods_step(tmp_path, tiny_llama, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    dpo = run_cli(["inspect-params", "--recipe", write_recipe(tmp_path, tiny_llama, data, "dpo"), "--json"], capsys)
    report = json.loads(dpo.out)
    assert report["memory"]["batch_size"] == 8 and "chosen and the rejected completion of 4 pairs" in report["memory"]["step"]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi", "answer": "1"}])
    grpo = write_recipe(tmp_path, tiny_llama, prompts, "grpo", {"num_generations": 4, "max_completion_length": 100},
                        rewards=["exact_match"])
    report = json.loads(run_cli(["inspect-params", "--recipe", grpo, "--json"], capsys).out)
    assert report["memory"]["batch_size"] == 4 and report["memory"]["seq_len"] == 512 + 100
    assert "(4 per prompt)" in report["memory"]["step"] and report["recipe"]["training_method"] == "grpo"
