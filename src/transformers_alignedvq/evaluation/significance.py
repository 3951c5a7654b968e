"""Is a difference in accuracy more than noise? Paired tests and verdicts for the report scripts.

Two models scored on the *same* questions are compared by McNemar's test on the questions where exactly one
of them is right (the discordant pairs): under "no difference" each such question is a fair coin, so the count
``b`` (only A right) out of ``b + c`` is Binomial(b + c, 1/2). The exact two-sided p-value doubles the smaller
tail; the mid-p-value counts the observed outcome's own probability only half, which keeps the test close to
its nominal level without being as conservative as the exact one (Fagerland, Lydersen & Laake, 2013). Verdicts
use the mid-p-value at ``ALPHA``.

Numbers over seeds are reported as mean ± sample standard deviation (`mean_sd`). The paired test is about the
questions: with several seeds, compare each seed's pair (same seed, same questions) and report every p-value;
do not pool the seeds' questions into one test, since one question answered by three seeds is not three
independent observations.

Pure Python (``math``), so report scripts can use it anywhere; the binomial tails are exact integer sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

ALPHA = 0.05
"""Significance level of every verdict: a difference is called real when its mid-p-value is below this."""

VERDICTS = ("agrees", "disagrees", "inconclusive")


@dataclass(frozen=True)
class PairedTest:
    """McNemar's test of A against B on the same questions.

    Attributes:
        only_a: questions A got right and B wrong (``b``).
        only_b: questions B got right and A wrong (``c``).
        questions: questions compared (concordant ones included).
        p_exact: exact two-sided p-value.
        p_mid: two-sided mid-p-value (what verdicts use).
    """

    only_a: int
    only_b: int
    questions: int
    p_exact: float
    p_mid: float

    @property
    def difference(self) -> float:
        """Accuracy of A minus accuracy of B, as a fraction (the discordant counts decide it)."""
        return (self.only_a - self.only_b) / self.questions if self.questions else 0.0

    def describe(self) -> str:
        """One line for a report: the difference in points, the discordant counts and the mid-p-value."""
        return (f"{100 * self.difference:+.2f} points ({self.only_a} vs {self.only_b} of {self.questions:,} "
                f"questions answered by one only; McNemar mid-p {self.p_mid:.3g})")


def _binomial_half_tail(n: int, k: int) -> tuple[float, float]:
    """P(X <= k) and P(X = k) for X ~ Binomial(n, 1/2), exactly (integer sums, one division)."""
    below = sum(math.comb(n, i) for i in range(k + 1))
    return below / 2**n, math.comb(n, k) / 2**n


def mcnemar(only_a: int, only_b: int, questions: int | None = None) -> PairedTest:
    """McNemar's exact and mid-p tests from the discordant counts (``questions`` defaults to their sum)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be non-negative, got {only_a} and {only_b}")
    discordant = only_a + only_b
    questions = discordant if questions is None else questions
    if questions < discordant:
        raise ValueError(f"{questions} questions cannot hold {discordant} discordant ones")
    if discordant == 0:
        return PairedTest(only_a, only_b, questions, 1.0, 1.0)
    tail, point = _binomial_half_tail(discordant, min(only_a, only_b))
    return PairedTest(only_a, only_b, questions, min(1.0, 2 * tail), min(1.0, 2 * tail - point))


def paired_test(correct_a: Sequence[bool | int], correct_b: Sequence[bool | int]) -> PairedTest:
    """McNemar's test from per-question correctness of A and B (same questions, same order)."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired results must cover the same questions: {len(correct_a)} vs {len(correct_b)}")
    only_a = sum(1 for a, b in zip(correct_a, correct_b) if a and not b)
    only_b = sum(1 for a, b in zip(correct_a, correct_b) if b and not a)
    return mcnemar(only_a, only_b, len(correct_a))


def verdict(test: PairedTest, *, a_better: bool = True, alpha: float = ALPHA) -> str:
    """The verdict on a claim that A is more accurate than B (``a_better``) or less (``not a_better``):

    * ``agrees``: the difference is significant (mid-p < ``alpha``) and goes the claimed way;
    * ``disagrees``: it is significant and goes the other way;
    * ``inconclusive``: it is not significant; the data cannot tell the two apart.
    """
    if test.p_mid >= alpha or test.only_a == test.only_b:
        return "inconclusive"
    return "agrees" if (test.only_a > test.only_b) == a_better else "disagrees"


def verdict_no_worse(test: PairedTest, margin: float, *, alpha: float = ALPHA) -> str:
    """The verdict on a claim that A is at most ``margin`` (a fraction, e.g. 0.005 for half a point) less
    accurate than B: ``agrees`` when the upper end of a two-sided ``1 - alpha`` confidence interval of B's lead
    is within the margin, ``disagrees`` when its lower end is beyond it, else ``inconclusive``.

    The interval is the Wald interval of a paired difference of proportions,
    ``d ± z * sqrt(b + c - (b - c)^2 / n) / n`` (``d`` = B's lead), which is adequate at the hundreds to
    thousands of questions the reports use. With no discordant question at all it has zero width, so the half
    width is then the exact upper bound on a rate seen 0 times in ``n``, ``1 - (alpha / 2)^(1 / n)``
    (about 3.7 / n): identical answers on 16 questions do not show two models within 0.1 point.
    """
    if test.questions == 0:
        return "inconclusive"
    lead = -test.difference
    z = _normal_quantile(1 - alpha / 2)
    discordant, gap = test.only_a + test.only_b, test.only_b - test.only_a
    half = z * math.sqrt(max(discordant - gap * gap / test.questions, 0.0)) / test.questions
    if discordant == 0:
        half = 1 - (alpha / 2) ** (1 / test.questions)
    if lead + half <= margin:
        return "agrees"
    if lead - half > margin:
        return "disagrees"
    return "inconclusive"


def _normal_quantile(p: float) -> float:
    """The standard normal quantile by bisection on ``erf`` (only called with a handful of alphas)."""
    low, high = -10.0, 10.0
    for _ in range(100):
        mid = (low + high) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for fewer than two values: one seed has no spread)."""
    if not values:
        raise ValueError("mean_sd needs at least one value")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def format_mean_sd(values: Sequence[float], *, scale: float = 100.0, digits: int = 2) -> str:
    """``"99.59 ± 0.04 (3 seeds)"`` from fractions (``scale`` 100 gives percent); one value prints alone."""
    mean, sd = mean_sd(values)
    if sd is None:
        return f"{scale * mean:.{digits}f} (1 seed)"
    return f"{scale * mean:.{digits}f} ± {scale * sd:.{digits}f} ({len(values)} seeds)"


def compare_results(a: dict | None, b: dict | None) -> PairedTest | None:
    """McNemar's test between two results dicts of `evaluation.evaluate_vqa` (as the example scripts record them),
    or ``None`` when they cannot be paired: either is missing or stored no per-question ``correct`` (runs from
    before it was recorded), or they were scored on different splits or numbers of questions."""
    if not a or not b or "correct" not in a or "correct" not in b:
        return None
    if a.get("eval_split") != b.get("eval_split") or len(a["correct"]) != len(b["correct"]):
        return None
    return paired_test(parse_correctness(a["correct"]), parse_correctness(b["correct"]))


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """One verdict on a claim made of several comparisons (e.g. "at every split"): ``agrees`` when all agree,
    ``disagrees`` when any disagrees, else ``inconclusive``."""
    if not verdicts:
        raise ValueError("combine_verdicts needs at least one verdict")
    if "disagrees" in verdicts:
        return "disagrees"
    return "agrees" if all(v == "agrees" for v in verdicts) else "inconclusive"


def correctness_bits(scores: Sequence[float]) -> str:
    """Per-question correctness as a compact string for results files: ``"1"`` where the score is 1 (exact
    match on one-reference datasets such as easy-VQA), ``"0"`` elsewhere."""
    return "".join("1" if score >= 1.0 else "0" for score in scores)


def parse_correctness(bits: str) -> list[bool]:
    """The inverse of `correctness_bits`; a clear error for anything but ``0``/``1`` characters."""
    if not isinstance(bits, str) or set(bits) - {"0", "1"}:
        raise ValueError("per-question correctness must be a string of '0' and '1'")
    return [bit == "1" for bit in bits]


__all__ = [
    "ALPHA",
    "VERDICTS",
    "PairedTest",
    "combine_verdicts",
    "compare_results",
    "correctness_bits",
    "format_mean_sd",
    "mcnemar",
    "mean_sd",
    "paired_test",
    "parse_correctness",
    "verdict",
    "verdict_no_worse",
]
