"""The same run as examples/grpo_my_reward.yaml, from Python:  python examples/grpo_my_reward.py"""

import lightning as L
from my_reward import short_first_sentence  # examples/my_reward.py (this script's folder is on the path)

from lightning_rlm.data import ChatFormat, PromptDataModule, TextSource
from lightning_rlm.methods import GRPO

if __name__ == "__main__":
    L.seed_everything(1234)
    model = GRPO(model_name_or_path="lrlm:smollm2-135m-instruct", rewards=[short_first_sentence],
                 num_generations=4, max_completion_length=32, lora_rank=8)
    data = PromptDataModule(source=TextSource(preset="tinystories"), tokenizer="lrlm:smollm2-135m-instruct",
                            prompt_tokens=8, batch_size=2,
                            chat=ChatFormat(user_template="Continue this story in one sentence.\n\n{text}"))
    L.Trainer(max_steps=3, limit_val_batches=0, log_every_n_steps=1).fit(model, data)
