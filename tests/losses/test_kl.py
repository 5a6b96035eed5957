"""Per-position KL, its aggregators and the tau hinge: hand-computed values and low-precision numerics."""

import math

import pytest
import torch

from lightning_rlm.losses import RMSE_EPS, aggregate_kl, fp32_log_softmax, kl_barrier, per_position_kl

# A 2-token vocabulary: student p_s = (1/2, 1/2) (logits 0, 0), base p_b = (3/4, 1/4) (logits ln 3, 0).
STUDENT = torch.tensor([[[0.0, 0.0]]])  # [B=1, T=1, V=2]
BASE = torch.tensor([[[math.log(3.0), 0.0]]])
# KL(base || student) = 3/4 ln((3/4)/(1/2)) + 1/4 ln((1/4)/(1/2)) = 3/4 ln 1.5 − 1/4 ln 2 ≈ 0.130812
KL_FWD = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
# KL(student || base) = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln 2 − 1/2 ln 1.5 ≈ 0.143841
KL_REV = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)

# Per-position KL [2, 3] with one position masked out (its 9.0 must not count anywhere).
KL = torch.tensor([[0.1, 0.2, 9.0], [0.3, 0.4, 0.5]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_hand_computed_values_of_both_directions():
    assert KL_FWD == pytest.approx(0.130812, abs=1e-6) and KL_REV == pytest.approx(0.143841, abs=1e-6)
    fwd = per_position_kl(STUDENT, BASE, "kl_fwd")
    rev = per_position_kl(STUDENT, BASE, "kl_rev")
    assert fwd.shape == (1, 1) and rev.shape == (1, 1)
    assert fwd.item() == pytest.approx(KL_FWD, abs=1e-6)
    assert rev.item() == pytest.approx(KL_REV, abs=1e-6)
    # swapping the roles of student and base swaps the directions; identical logits give 0
    assert per_position_kl(BASE, STUDENT, "kl_rev").item() == pytest.approx(KL_FWD, abs=1e-6)
    assert per_position_kl(BASE, BASE, "kl_fwd").item() == 0.0
    with pytest.raises(ValueError, match="direction"):
        per_position_kl(STUDENT, BASE, "kl_sym")  # type: ignore[arg-type]


def test_kl_is_summed_over_vocab_per_position():
    # second position: student (1/2, 1/2) vs base (1/2, 1/2) → 0; the batch row is [KL_REV, 0]
    student = torch.zeros(1, 2, 2)
    base = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])
    assert torch.allclose(per_position_kl(student, base, "kl_rev"), torch.tensor([[KL_REV, 0.0]]), atol=1e-6)


def test_aggregators_over_masked_positions_only():
    # masked values: 0.1, 0.2, 0.3, 0.4, 0.5 (M = 5)
    assert aggregate_kl(KL, MASK, "mean").item() == pytest.approx(1.5 / 5)  # 0.3
    # rmse: sqrt((0.01 + 0.04 + 0.09 + 0.16 + 0.25) / 5 + eps) = sqrt(0.11 + 1e-6)
    assert aggregate_kl(KL, MASK, "rmse").item() == pytest.approx(math.sqrt(0.11 + 1e-6), rel=1e-6)
    # p95, linear interpolation: rank 0.95 · (5 − 1) = 3.8 → 0.4 + 0.8 · (0.5 − 0.4) = 0.48
    assert aggregate_kl(KL, MASK, "p95").item() == pytest.approx(0.48, rel=1e-6)
    assert aggregate_kl(KL, MASK, "max").item() == pytest.approx(0.5)
    # log-mean-exp: ln((e^.1 + e^.2 + e^.3 + e^.4 + e^.5) / 5), between the mean and the max
    lme = math.log(sum(math.exp(v) for v in (0.1, 0.2, 0.3, 0.4, 0.5)) / 5)
    assert aggregate_kl(KL, MASK, "logsumexp").item() == pytest.approx(lme, rel=1e-6)
    assert 0.3 < lme < 0.5
    with pytest.raises(ValueError, match="aggregate"):
        aggregate_kl(KL, MASK, "median")  # type: ignore[arg-type]


def test_hinge_gives_exactly_zero_gradient_below_tau():
    student = STUDENT.clone().requires_grad_(True)
    div = aggregate_kl(per_position_kl(student, BASE, "kl_rev"), torch.ones(1, 1), "rmse")  # ≈ 0.1438
    barrier = kl_barrier(div, tau=0.2, lam=5.0)
    barrier.backward()
    assert barrier.item() == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student))  # exactly zero, not just small
    # above tau the gradient is lam, and the value lam · (div − tau)
    d = torch.tensor(0.5, requires_grad=True)
    out = kl_barrier(d, tau=0.2, lam=5.0)
    out.backward()
    assert out.item() == pytest.approx(1.5) and d.grad.item() == pytest.approx(5.0)


def test_low_precision_inputs_give_float32_log_softmax_and_kl():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 7)
    x = torch.randn(2, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = layer(x)  # bf16 under autocast
        base = layer(x + 0.5)
        assert student.dtype == torch.bfloat16
        assert fp32_log_softmax(student).dtype == torch.float32
        kl = per_position_kl(student, base, "kl_rev")
        assert kl.dtype == torch.float32
    # the same bf16 logits handled in float32 by hand
    ls, lb = student.float().log_softmax(-1), base.float().log_softmax(-1)
    assert torch.allclose(kl, (ls.exp() * (ls - lb)).sum(-1), atol=1e-6)
    fp16 = per_position_kl(student.half(), base.half(), "kl_fwd")
    assert fp16.dtype == torch.float32 and torch.isfinite(fp16).all()


def test_rmse_at_zero_kl_has_a_finite_gradient_in_fp16_and_bf16():
    for dtype in (torch.float16, torch.bfloat16):
        logits = torch.randn(2, 3, 5).to(dtype).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kl = per_position_kl(logits, logits.detach(), "kl_rev")  # exactly 0 everywhere
            div = aggregate_kl(kl, torch.ones(2, 3), "rmse")
        assert div.dtype == torch.float32 and div.item() == pytest.approx(math.sqrt(RMSE_EPS))
        (div + kl_barrier(div, tau=0.0, lam=1.0)).backward()
        assert torch.isfinite(logits.grad).all(), dtype
        # the eps itself survives fp16 input: sqrt never sees 0 (the source's 1e-8 underflowed there)
        zeros = torch.zeros(2, 3, dtype=torch.float16, requires_grad=True)
        aggregate_kl(zeros, torch.ones(2, 3), "rmse").backward()
        assert torch.isfinite(zeros.grad).all()


@pytest.mark.parametrize("how", ["mean", "rmse", "p95", "max", "logsumexp"])
def test_empty_mask_gives_zero_and_a_finite_gradient(how):
    logits = torch.randn(2, 3, 5, dtype=torch.float16, requires_grad=True)
    base = torch.randn(2, 3, 5, dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        div = aggregate_kl(per_position_kl(logits, base, "kl_rev"), torch.zeros(2, 3), how)
        loss = kl_barrier(div, tau=0.0, lam=1.0) + div
    assert div.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and not logits.grad.any()
    # garbage (inf) at masked positions cannot leak into the zero
    garbage = torch.full((2, 3), float("inf"), requires_grad=True)
    out = aggregate_kl(garbage, torch.zeros(2, 3), how)
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(garbage.grad).all()


def test_p95_on_bf16_inputs():
    kl = KL.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p95 = aggregate_kl(kl, MASK, "p95")
    assert p95.dtype == torch.float32
    # bf16 rounding of the inputs only: 0.4 → 0.40039, 0.5 → 0.5
    expected = 0.4 + 0.8 * (0.5 - 0.4)
    assert p95.item() == pytest.approx(expected, abs=2e-3)
    p95.backward()
    # the gradient reaches only the two positions the quantile interpolates between (0.2 and 0.8)
    assert torch.allclose(kl.grad.float(), torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.2, 0.8]]), atol=1e-2)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="shape"):
        aggregate_kl(KL, MASK[:, :2], "mean")
    with pytest.raises(ValueError, match="shape"):
        per_position_kl(STUDENT, torch.zeros(1, 1, 3), "kl_rev")
