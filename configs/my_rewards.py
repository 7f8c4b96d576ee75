"""An example reward function for configs/qwen-grpo-custom-reward.yaml: GRPOTrainer calls it with the completions
(and every dataset column as a keyword list) and takes one float per completion."""


def concise(completions, **kwargs) -> list[float]:
    """1.0 for an answer of at most 50 words, falling to 0 at 250 words."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [max(0.0, min(1.0, (250 - len(text.split())) / 200)) for text in texts]
