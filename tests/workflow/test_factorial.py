"""Steepest ascent from a two-level factorial, checked on the GAN-RL seed note's own table."""

import math

import pytest

from lightning_rlm.workflow import round_clean, steepest_ascent
from lightning_rlm.workflow.factorial import code_factor

# ids 00-03: a 2^(3-1) half fraction; 04: the center; response MAUVE (seed 000, 02/26/2026)
SEED_RUNS = [
    dict(id="00", g_lr=2e-5, d_lr=1e-4, d_scale=10.0, mauve=0.119),
    dict(id="01", g_lr=2e-5, d_lr=5e-6, d_scale=0.1, mauve=0.073),
    dict(id="02", g_lr=5e-6, d_lr=1e-4, d_scale=0.1, mauve=0.072),
    dict(id="03", g_lr=5e-6, d_lr=5e-6, d_scale=10.0, mauve=0.075),
    dict(id="04", g_lr=1e-5, d_lr=2e-5, d_scale=1.0, mauve=0.09),
]
CENTER = dict(g_lr=1e-5, d_lr=2e-5, d_scale=1.0)
SEED_RUN_05 = dict(g_lr=3e-5, d_lr=2e-4, d_scale=30.0)


def test_effects_are_the_orthogonal_contrasts():
    p = steepest_ascent(SEED_RUNS, CENTER)
    # b_j = sum_i x_ij y_i / 4 over the factorial runs (the center has x = 0)
    assert p.effects["g_lr"] == pytest.approx((0.119 + 0.073 - 0.072 - 0.075) / 4)
    assert p.effects["d_lr"] == pytest.approx((0.119 - 0.073 + 0.072 - 0.075) / 4)
    assert p.effects["d_scale"] == pytest.approx((0.119 - 0.073 - 0.072 + 0.075) / 4)
    assert p.curvature == pytest.approx(0.09 - (0.119 + 0.073 + 0.072 + 0.075) / 4)


def test_direction_matches_the_seed_run_05():
    p = steepest_ascent(SEED_RUNS, CENTER)
    for f in CENTER:  # every factor goes up, as in run 05
        assert p.coded[f] > 0 and p.raw[f] > CENTER[f] and SEED_RUN_05[f] > CENTER[f]
    assert max(p.coded.values()) == pytest.approx(1.5)  # d-scale has the largest effect


def test_rounded_proposal_equals_the_seed_run_05_for_a_band_of_steps():
    for step in (1.42, 1.5, 1.58):
        assert steepest_ascent(SEED_RUNS, CENTER, step=step).values == SEED_RUN_05
    assert steepest_ascent(SEED_RUNS, CENTER, step=1.0).values != SEED_RUN_05
    # the upper interval matters for d-lr (0.7 decades up vs 0.6 down): the lower one stops at 1e-4
    assert steepest_ascent(SEED_RUNS, CENTER, interval="lower").values["d_lr"] == 1e-4


def test_minimize_reverses_the_direction():
    p = steepest_ascent(SEED_RUNS, CENTER, maximize=False)
    assert all(p.raw[f] < CENTER[f] for f in CENTER)


def test_round_clean_and_coding():
    assert round_clean(2.6e-5) == 3e-5 and round_clean(1.66e-4) == 2e-4 and round_clean(31.6) == 30.0
    assert round_clean(4.0) == 5.0 and round_clean(0.0009) == 1e-3 and round_clean(-7.0) == -5.0
    assert code_factor(1e-4, 2e-5, 5e-6, 1e-4) == pytest.approx(1.0)
    assert code_factor(5e-6, 2e-5, 5e-6, 1e-4) == pytest.approx(-1.0)
    assert code_factor(2e-4, 2e-5, 5e-6, 1e-4) == pytest.approx(1.0 / math.log10(5))


def test_bad_designs_are_clear_errors():
    with pytest.raises(ValueError, match="strictly between"):
        steepest_ascent(SEED_RUNS, dict(g_lr=2e-5, d_lr=2e-5, d_scale=1.0))
    with pytest.raises(ValueError, match="rank deficient"):
        confounded = [dict(g_lr=2e-5, d_lr=1e-4, d_scale=10.0, mauve=0.1),  # g-lr and d-lr move together
                      dict(g_lr=5e-6, d_lr=5e-6, d_scale=0.1, mauve=0.1),
                      dict(g_lr=2e-5, d_lr=1e-4, d_scale=0.1, mauve=0.1), SEED_RUNS[4]]
        steepest_ascent(confounded, CENTER)
