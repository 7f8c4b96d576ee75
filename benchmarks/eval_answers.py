"""lora eval --answers: batched generation (left padding) against one prompt at a time, on one loaded model.

    python benchmarks/eval_answers.py [TARGET] [--answers FILE] [--batch-sizes 1,8] [--max-new-tokens 64] [--rounds 2]
                                      [--threads N] [--random-weights DIR]

Each batch size answers every question of the file, in alternating rounds (so a machine that gets busier or quieter
affects each alike); prints wall seconds, this process's CPU seconds, answers/s and generated tokens/s per round, and
whether the greedy answers are the same at every batch size. Runs on the GPU when there is one, else on the CPU.
On a CPU shared with other work, --threads 1 and the CPU seconds measure the work itself: wall time there
follows the other processes, and several threads spin while they wait for a core.
--random-weights DIR (a folder with a config.json and a tokenizer, such as .gpu/tokenizer with the embedded model's
config saved beside it): the same shape with random weights, for a GPU machine the weights cannot reach. Random
weights rarely stop early, so every answer runs to --max-new-tokens at every batch size.
"""

import argparse
import json
import time

from lora_cli.evaluate.answers import answer_questions, read_answers
from lora_cli.generate import Sampling, load_target


def random_model(folder: str) -> str:
    """A model folder holding the shape in FOLDER's config.json with random weights, and its tokenizer."""
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    out = tempfile.mkdtemp(prefix="random-model-")
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--answers", default="data/pirate-facts.jsonl")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--random-weights", metavar="DIR", help="config and tokenizer of a model to build at random")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.random_weights:
        args.target = random_model(args.random_weights)
    target = load_target(args.target)
    questions = read_answers(args.answers)
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    answer_questions(target, questions[:2], max(sizes), Sampling(max_new_tokens=4))  # warm-up
    answers, rows = {}, []
    for round_number in range(args.rounds):
        for size in sizes:
            started, cpu_started = time.perf_counter(), time.process_time()
            result = answer_questions(target, questions, size, Sampling(max_new_tokens=args.max_new_tokens))
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
            answers.setdefault(size, [row["answer"] for row in result["rows"]])
            rows.append({"round": round_number + 1, "batch_size": size, "seconds": round(seconds, 2),
                         "cpu_seconds": round(cpu_seconds, 2),
                         "answers_per_second": round(len(questions) / seconds, 2),
                         "tokens_per_second": round(result["answer_tokens"] / seconds, 1),
                         "answer_tokens": result["answer_tokens"]})
            print(json.dumps(rows[-1]), flush=True)
    same = all(answers[size] == answers[sizes[0]] for size in sizes)
    import torch

    device = str(target.model.device)
    print(json.dumps({"target": args.target, "device": device, "threads": torch.get_num_threads(),
                      "questions": len(questions),
                      "same_answers_at_every_batch_size": same}))


if __name__ == "__main__":
    main()
