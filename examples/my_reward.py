"""A reward is any function `(prompts, completions, **fields) -> list[float]` (TRL's signature): here, a
completion earns 1 for ending its first sentence within 12 words, and fields of the prompt rows (e.g. a
jsonl's `answer`) would arrive as keyword lists."""


def short_first_sentence(prompts: list[str], completions: list[str], **fields) -> list[float]:
    rewards = []
    for text in completions:
        first = text.strip().split(".")[0]
        rewards.append(1.0 if "." in text and len(first.split()) <= 12 else 0.0)
    return rewards
