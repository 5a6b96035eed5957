"""Tests for the GRPO-family loss math, against values computed by hand in the tests."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_rlm.losses import (
    LossType,
    group_advantages,
    kl_penalty,
    masked_mean,
    policy_loss,
)

EPS = 1e-4


# ---------------------------------------------------------------------------------------------------- advantages
REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])  # B=2 prompts x G=4


def test_group_advantages_group_scaling() -> None:
    # Group 1: mean 0.25, deviations [0.75, -0.25, -0.25, -0.25], unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25.
    # Group 2: all equal -> deviations 0 (std 0, eps keeps it finite).
    std1 = 0.5
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]) / torch.tensor(
        [std1 + EPS] * 4 + [0.0 + EPS] * 4
    )
    torch.testing.assert_close(group_advantages(REWARDS, 4, "group"), expected)


def test_group_advantages_batch_scaling() -> None:
    # Batch mean 9/8 = 1.125; squared deviations 0.015625 + 3 * 1.265625 + 4 * 0.765625 = 6.875; unbiased / 7.
    batch_std = math.sqrt(6.875 / 7)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]) / (batch_std + EPS)
    torch.testing.assert_close(group_advantages(REWARDS, 4, "batch"), expected)


def test_group_advantages_no_scaling() -> None:
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, 4, "none"), expected)


def test_group_advantages_pairs() -> None:
    # G=2, rewards [1, 3]: mean 2, unbiased std sqrt(((-1)^2 + 1^2) / 1) = sqrt(2).
    adv = group_advantages(torch.tensor([1.0, 3.0]), 2)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0]) / (math.sqrt(2) + EPS))
    # Integer rewards are accepted (promoted to float).
    torch.testing.assert_close(group_advantages(torch.tensor([1, 3]), 2, "none"), torch.tensor([-1.0, 1.0]))


def test_group_advantages_errors() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "per_token")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)


# ---------------------------------------------------------------------------------------------------------- KL
def test_kl_zero_when_equal() -> None:
    logp = torch.log_softmax(torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(0)), -1)[..., 0]
    for estimator in ("k1", "k3"):
        assert torch.equal(kl_penalty(logp, logp.clone(), estimator), torch.zeros_like(logp))


def test_kl_values_and_k3_nonnegative() -> None:
    logp = torch.tensor([[math.log(0.5), math.log(0.2)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.4)]])
    # k1 = logp - ref ; k3 = r - log r - 1 with r = p_ref / p
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[math.log(2.0), math.log(0.5)]]))
    torch.testing.assert_close(
        kl_penalty(logp, ref, "k3"), torch.tensor([[0.5 - math.log(0.5) - 1, 2.0 - math.log(2.0) - 1]])
    )
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 32, generator=g) * 3, torch.randn(64, 32, generator=g) * 3
    assert (kl_penalty(a, b, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(a, b, "k2")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------- policy loss
# Two completions, T=3. old_logp = 0, so ratio = exp(logp). Row 0 has a padded last token holding garbage.
RATIOS = [[1.1, 1.5, math.exp(50.0)], [0.5, 1.0, 1.3]]
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
ADV = torch.tensor([1.0, -0.5])
# eps = 0.2 -> per-token loss -min(r*A, clip(r, 0.8, 1.2)*A):
#   row 0 (A=1):    [-1.1, -min(1.5, 1.2) = -1.2]                      (token 1 clipped high)
#   row 1 (A=-0.5): [-min(-0.25, -0.4) = 0.4, 0.5, -min(-0.65, -0.6) = 0.65]  (token 0 clipped low)
ROW0, ROW1 = [-1.1, -1.2], [0.4, 0.5, 0.65]
TOKEN_SUM = sum(ROW0) + sum(ROW1)  # -0.75


def _logp() -> torch.Tensor:
    return torch.tensor(RATIOS, dtype=torch.float64).log()


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        ("grpo", (sum(ROW0) / 2 + sum(ROW1) / 3) / 2),  # (-1.15 + 0.51667) / 2
        ("dapo", TOKEN_SUM / 5),  # -0.15
        ("dr_grpo", TOKEN_SUM / (2 * 4)),  # max_completion_length = 4 -> -0.09375
    ],
)
def test_policy_loss_hand_computed(loss_type: LossType, expected: float) -> None:
    logp = _logp()
    loss, stats = policy_loss(
        logp, torch.zeros_like(logp), ADV, MASK, loss_type=loss_type, max_completion_length=4
    )
    assert loss.item() == pytest.approx(expected)
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 5)
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 5)
    assert stats["ratio_mean"].item() == pytest.approx((1.1 + 1.5 + 0.5 + 1.0 + 1.3) / 5)
    assert "kl" not in stats


def test_policy_loss_clip_higher() -> None:
    # DAPO clip-higher: range [0.8, 1.6]; row 0 token 1 is no longer clipped (-1.5), row 1 token 0 still is.
    logp = _logp()
    loss, stats = policy_loss(logp, torch.zeros_like(logp), ADV, MASK, loss_type="dapo", epsilon_high=0.6)
    assert loss.item() == pytest.approx((-1.1 - 1.5 + 0.4 + 0.5 + 0.65) / 5)
    assert stats["clip_frac"].item() == pytest.approx(1 / 5)


def test_policy_loss_with_kl() -> None:
    logp = _logp()
    ref = torch.zeros_like(logp)
    # k3 with ref = 0: exp(-logp) + logp - 1 = 1/r + log r - 1, on the 5 real tokens.
    k3 = [1 / r + math.log(r) - 1 for r in (*RATIOS[0][:2], *RATIOS[1])]
    loss, stats = policy_loss(
        logp, torch.zeros_like(logp), ADV, MASK, loss_type="dapo", beta=0.1, ref_logp=ref
    )
    assert loss.item() == pytest.approx((TOKEN_SUM + 0.1 * sum(k3)) / 5)
    assert stats["kl"].item() == pytest.approx(sum(k3) / 5)
    # With beta = 0 the KL is still reported but does not enter the loss.
    loss0, stats0 = policy_loss(logp, torch.zeros_like(logp), ADV, MASK, loss_type="dapo", ref_logp=ref)
    assert loss0.item() == pytest.approx(TOKEN_SUM / 5)
    assert stats0["kl"].item() == pytest.approx(sum(k3) / 5)
    # k1 estimator: mean of log r.
    _, stats1 = policy_loss(logp, None, ADV, MASK, beta=0.1, ref_logp=ref, kl_estimator="k1")
    assert stats1["kl"].item() == pytest.approx(sum(math.log(r) for r in (*RATIOS[0][:2], *RATIOS[1])) / 5)


def _unclipped(
    logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, loss_type: LossType, max_len: int
) -> torch.Tensor:
    """Plain policy-gradient surrogate -exp(logp - sg(logp)) * A, aggregated by hand."""
    m = mask.to(logp.dtype)
    per_token = -torch.exp(logp - logp.detach()) * adv[:, None] * m
    if loss_type == "grpo":
        return (per_token.sum(1) / m.sum(1)).mean()
    if loss_type == "dapo":
        return per_token.sum() / m.sum()
    return per_token.sum() / (logp.shape[0] * max_len)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_single_iteration_equals_unclipped(loss_type: LossType) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.log_softmax(torch.randn(4, 5, 11, generator=g, dtype=torch.float64), -1)[..., 0]  # [4, 5]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)

    logp = base.clone().requires_grad_(True)
    loss, stats = policy_loss(logp, None, adv, mask, loss_type=loss_type, max_completion_length=6)
    loss.backward()

    ref_logp = base.clone().requires_grad_(True)
    ref_loss = _unclipped(ref_logp, adv, mask, loss_type, 6)
    ref_loss.backward()

    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(logp.grad, ref_logp.grad)
    assert stats["clip_frac"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    if loss_type == "grpo":
        # Value -mean(A); gradient -A_i / (n_i * N) on real tokens, 0 on padding.
        assert loss.item() == pytest.approx(-adv.mean().item())
        n = mask.sum(1, keepdim=True).double()
        torch.testing.assert_close(logp.grad, -adv[:, None] / (n * 4) * mask)


def test_clipped_token_gets_no_gradient() -> None:
    # Token 0: ratio 1.5 > 1.2 with A > 0 -> clipped, zero gradient. Token 1: ratio 1 -> gradient -A / (n * N).
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = torch.tensor([[math.log(1.5), 0.0]], dtype=torch.float64, requires_grad=True)
    loss, stats = policy_loss(logp, old, torch.tensor([2.0]), torch.ones(1, 2), epsilon=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-(1.2 * 2.0 + 1.0 * 2.0) / 2)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -2.0 / 2]], dtype=torch.float64))
    assert stats["clip_frac_high"].item() == pytest.approx(0.5)
    # Same ratio with a negative advantage is not clipped (the min keeps the unclipped, worse value).
    logp2 = logp.detach().clone().requires_grad_(True)
    policy_loss(logp2, old, torch.tensor([-2.0]), torch.ones(1, 2))[0].backward()
    torch.testing.assert_close(logp2.grad, torch.tensor([[1.5 * 2.0 / 2, 2.0 / 2]], dtype=torch.float64))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_all_zero_mask_row_is_finite(loss_type: LossType) -> None:
    logp = torch.tensor([[-1.0, -2.0], [30.0, -80.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0], [-30.0, 0.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    loss, stats = policy_loss(
        logp,
        old,
        torch.tensor([1.0, -1.0]),
        mask,
        loss_type=loss_type,
        beta=0.1,
        ref_logp=torch.zeros(2, 2),
        max_completion_length=2,
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[1].abs().sum() == 0
    assert all(torch.isfinite(v) for v in stats.values())
    # Fully masked batch: loss 0, not NaN.
    empty, _ = policy_loss(
        logp.detach(), None, torch.ones(2), torch.zeros(2, 2), loss_type=loss_type, max_completion_length=2
    )
    assert empty.item() == 0.0


def test_policy_loss_errors() -> None:
    logp, mask, adv = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(logp, None, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(logp, None, adv, mask, loss_type="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same shape"):
        policy_loss(logp, None, adv, torch.ones(2, 4))


# ----------------------------------------------------------------------------------------------------- helpers
def test_masked_mean() -> None:
    x = torch.tensor([[1.0, 2.0, float("inf")], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 4 + 5 + 6) / 5)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 5.0, 0.0]))
    assert masked_mean(x, torch.zeros(3, 3)).item() == 0.0
