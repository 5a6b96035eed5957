"""What a real chat policy needs: stop at the chat template's end of turn, gradient checkpointing, a dtype."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_rlm.models.hf import enable_gradient_checkpointing, load_policy, stop_token_ids
from lightning_rlm.rollout import completion_logprobs

CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def test_stop_ids_add_the_end_of_turn_token_of_the_chat_template(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert stop_token_ids(tok) == tok.eos_token_id  # no template: EOS alone, as an int
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tok) == [tok.eos_token_id, im_end]

    class Gen:
        eos_token_id = [im_end, 7]

    assert stop_token_ids(tok, Gen()) == [tok.eos_token_id, im_end, 7]


def test_load_policy_dtype_and_stop_ids(tiny_llama_dir):
    model, tok, stop = load_policy(str(tiny_llama_dir), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16 and stop == tok.eos_token_id


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama_dir):
    ids = torch.randint(0, 500, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).train()
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert model.is_activation_checkpointing
        completion_logprobs(model, ids, mask, 4).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)
