"""Quiet-STaR's loss math (lightning_rlm.losses.quiet_star): the docstring examples and a few hand checks."""

from __future__ import annotations

import doctest

import torch

import lightning_rlm.losses.quiet_star as qs
from lightning_rlm.losses import leave_one_out_baseline


def test_doctests_pass() -> None:
    result = doctest.testmod(qs)
    assert result.attempted > 0 and result.failed == 0


def test_advantage_along_the_thought_dim_is_the_leave_one_out_of_that_dim() -> None:
    reward = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))  # [B, P, Lq]
    null = torch.randn(2, 1, 5, generator=torch.Generator().manual_seed(1))  # [B, 1, Lq]
    by_hand = reward - leave_one_out_baseline(reward.transpose(1, 2), null.transpose(1, 2)).transpose(1, 2)
    assert torch.equal(qs.reinforce_advantage(reward, null, dim=1), by_hand)
    # with the null thought the advantages no longer sum to 0 over the thoughts; without it they do
    torch.testing.assert_close(qs.reinforce_advantage(reward, dim=1).sum(1), torch.zeros(2, 5))


def test_bounded_advantages_and_the_fraction_bounded() -> None:
    adv = torch.tensor([-0.3, 0.05, 0.2, -0.01])
    clipped, frac = qs.bound_advantage(adv, 0.1)
    assert clipped.tolist() == torch.tensor([-0.1, 0.05, 0.1, -0.01]).tolist() and frac.item() == 0.5
    smooth, _ = qs.bound_advantage(adv, 0.1, "tanh")
    assert smooth.abs().max() < 0.1 and torch.allclose(smooth, 0.1 * torch.tanh(adv / 0.1))


def test_talk_logprobs_pair_each_thought_row_with_its_window() -> None:
    B, P, Lq, J, V = 2, 3, 4, 2, 5
    logits = torch.randn(B * P, Lq, J, V, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, V, (B, Lq, J), generator=torch.Generator().manual_seed(1))
    logp = qs.talk_logprobs(logits, targets)  # [B, P, Lq, J]
    b, k, q, j = 1, 2, 3, 1
    expected = logits[b * P + k, q, j].log_softmax(-1)[targets[b, q, j]]
    torch.testing.assert_close(logp[b, k, q, j], expected)


def test_thought_entropy_without_sampled_tokens_is_zero() -> None:
    stats = qs.thought_entropy_stats(torch.zeros(1, 2, 3, 0), torch.ones(1, 2, 3))
    assert list(stats) == ["thought_entropy"] and stats["thought_entropy"].item() == 0.0
    stats = qs.thought_entropy_stats(torch.tensor([[[[1.0, 3.0]], [[5.0, 0.0]]]]), torch.tensor([[[1.0], [0.0]]]))
    assert stats["thought_entropy"].item() == 2.0 and stats["thought_entropy_max"].item() == 3.0
