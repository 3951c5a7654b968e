"""The paired test and verdicts the report scripts use, against hand-computed values and scipy."""

import math

import pytest

from transformers_alignedvq.evaluation.significance import (
    ALPHA,
    combine_verdicts,
    compare_results,
    correctness_bits,
    format_mean_sd,
    mcnemar,
    mean_sd,
    paired_test,
    parse_correctness,
    verdict,
    verdict_no_worse,
)


def test_mcnemar_by_hand():
    # b = 10, c = 2: P(X <= 2) for Binomial(12, 1/2) = (1 + 12 + 66) / 4096
    test = mcnemar(10, 2, 100)
    assert test.p_exact == pytest.approx(2 * 79 / 4096, rel=1e-12)
    assert test.p_mid == pytest.approx(2 * 79 / 4096 - 66 / 4096, rel=1e-12)
    assert test.difference == pytest.approx(0.08)
    # symmetric in A and B, and a balanced split is no evidence at all
    assert mcnemar(2, 10).p_exact == test.p_exact
    assert mcnemar(5, 5).p_exact == 1.0 and mcnemar(0, 0).p_mid == 1.0
    # one discordant question: exact p = 1, mid-p = 2 * (1/2) - 1/2
    assert mcnemar(1, 0).p_exact == 1.0 and mcnemar(1, 0).p_mid == pytest.approx(0.5)


@pytest.mark.parametrize("only_a,only_b", [(3, 17), (40, 60), (0, 9), (120, 80), (500, 560)])
def test_mcnemar_matches_scipy(only_a, only_b):
    stats = pytest.importorskip("scipy.stats")
    test = mcnemar(only_a, only_b)
    n, k = only_a + only_b, min(only_a, only_b)
    assert test.p_exact == pytest.approx(stats.binomtest(only_a, n, 0.5).pvalue, rel=1e-9)
    mid = 2 * stats.binom.cdf(k, n, 0.5) - stats.binom.pmf(k, n, 0.5)
    assert test.p_mid == pytest.approx(min(1.0, mid), rel=1e-9)
    assert test.p_mid <= test.p_exact


def test_paired_test_counts_discordant_questions():
    a = [1, 1, 0, 1, 0, 1, 1, 1]
    b = [1, 0, 0, 0, 1, 1, 0, 1]
    test = paired_test(a, b)
    assert (test.only_a, test.only_b, test.questions) == (3, 1, 8)
    assert test.difference == pytest.approx((6 - 4) / 8)
    with pytest.raises(ValueError, match="same questions"):
        paired_test(a, b[:-1])
    with pytest.raises(ValueError):
        mcnemar(-1, 2)
    with pytest.raises(ValueError):
        mcnemar(5, 5, 3)


def test_verdicts_follow_the_test():
    assert ALPHA == 0.05
    strong = mcnemar(40, 10, 2000)  # mid-p ~ 1e-5
    assert verdict(strong) == "agrees" and verdict(strong, a_better=False) == "disagrees"
    assert verdict(mcnemar(10, 40, 2000)) == "disagrees"
    # +0.10 points on 2,000 questions (the "DLP helps" case): 6 vs 4 discordant is noise
    weak = mcnemar(6, 4, 2000)
    assert weak.p_mid > 0.05 and verdict(weak) == "inconclusive"
    # the level is a parameter: a test significant at 0.05 need not be at 0.01
    borderline = mcnemar(10, 2)
    assert verdict(borderline) == "agrees" and verdict(borderline, alpha=0.01) == "inconclusive"


def test_no_worse_verdict():
    # 10,000 questions, 20 vs 20 discordant: B's lead is 0 ± 0.12 points, inside half a point
    assert verdict_no_worse(mcnemar(20, 20, 10_000), 0.005) == "agrees"
    # B ahead by 20 points: beyond the margin for sure
    assert verdict_no_worse(mcnemar(0, 200, 1000), 0.005) == "disagrees"
    # B ahead by 0.5 point on 2,000 questions: cannot tell
    assert verdict_no_worse(mcnemar(5, 15, 2000), 0.005) == "inconclusive"
    # the interval by hand: lead 0.02, half-width 1.95996 * sqrt(40 - 400/1000) / 1000
    test = mcnemar(10, 30, 1000)
    half = 1.959964 * math.sqrt(40 - 400 / 1000) / 1000
    assert verdict_no_worse(test, 0.02 + half + 1e-4) == "agrees"
    assert verdict_no_worse(test, 0.02 + half - 1e-4) == "inconclusive"
    assert verdict_no_worse(test, 0.02 - half - 1e-4) == "disagrees"


def test_mean_sd_and_format():
    mean, sd = mean_sd([0.9959, 0.9953, 0.9962])
    assert mean == pytest.approx(0.99580) and sd == pytest.approx(0.000458258, rel=1e-5)
    assert mean_sd([0.5]) == (0.5, None)
    assert format_mean_sd([0.9959, 0.9953, 0.9962]) == "99.58 ± 0.05 (3 seeds)"
    assert format_mean_sd([0.9959]) == "99.59 (1 seed)"
    with pytest.raises(ValueError):
        mean_sd([])


def test_correctness_bits_round_trip():
    bits = correctness_bits([1.0, 0.0, 1.0, 0.3333])
    assert bits == "1010" and parse_correctness(bits) == [True, False, True, False]
    with pytest.raises(ValueError, match="'0' and '1'"):
        parse_correctness("10x")


def test_results_are_paired_only_on_the_same_questions():
    a = {"accuracy": 0.75, "correct": "1101", "eval_split": "test"}
    b = {"accuracy": 0.50, "correct": "1001", "eval_split": "test"}
    test = compare_results(a, b)
    assert (test.only_a, test.only_b, test.questions) == (1, 0, 4)
    assert compare_results(a, {**b, "eval_split": "validation"}) is None  # other questions
    assert compare_results(a, {**b, "correct": "10011"}) is None
    assert compare_results(a, {"accuracy": 0.5}) is None and compare_results(None, b) is None  # stored no per-question results


def test_combined_verdicts():
    assert combine_verdicts(["agrees", "agrees"]) == "agrees"
    assert combine_verdicts(["agrees", "inconclusive"]) == "inconclusive"
    assert combine_verdicts(["agrees", "disagrees", "inconclusive"]) == "disagrees"
    with pytest.raises(ValueError):
        combine_verdicts([])


def test_no_worse_with_no_discordant_question_needs_enough_questions():
    # identical answers: the exact bound on an unseen discordance rate (about 3.7 / n) decides, not a zero width
    assert verdict_no_worse(mcnemar(0, 0, 16), 0.001) == "inconclusive"
    assert verdict_no_worse(mcnemar(0, 0, 9673), 0.001) == "agrees"
    assert verdict_no_worse(mcnemar(0, 0, 2000), 0.005) == "agrees"
    assert verdict_no_worse(mcnemar(0, 0, 500), 0.005) == "inconclusive"
