"""Paired tests and multiplicity for comparing two models on the same test images.

The statistical unit is named everywhere: a test image is scored once per seed, so pooling its
calls over seeds would count one image several times (pseudo-replication).  These functions
take one value per **image** (seed-averaged where there are several seeds) and, where images
share a patient, flip or resample whole **patients**:

* :func:`mcnemar_exact`: McNemar's exact (binomial) test for one seed's discordant images;
* :func:`sign_flip_test`: a paired permutation test of the mean difference over images (e.g.
  seed-averaged correctness of variant minus baseline): under the null the sign of each
  patient's summed difference is a coin flip.  Exact (all 2^k sign patterns) for up to
  :data:`EXACT_MAX` patients with a non-zero difference, else Monte Carlo;
* :func:`holm`: Holm's step-down adjustment of the p-values of one family (an ablation group),
  which controls the family-wise error rate without assuming independence;
* :func:`paired_comparison` puts them together for one variant against its baseline, and
  :func:`judge_families` adjusts a table of such comparisons and gives each its :func:`verdict`.
"""

from __future__ import annotations

from itertools import product
from typing import Iterator, Sequence

import numpy as np
from scipy import stats as sps

#: Bootstrap defaults: resamples and the two-sided confidence level.
N_BOOTSTRAP = 1000
CI_LEVEL = 0.95

#: Largest number of non-zero patients for which every sign pattern is enumerated (2^16 = 65,536).
EXACT_MAX = 16
#: Monte Carlo sign patterns above :data:`EXACT_MAX` (p-values then carry about 0.002 of noise).
N_PERMUTATIONS = 20_000


def resample_indices(n_items: int, n_boot: int, rng: np.random.Generator,
                     groups: Sequence | np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Yield ``n_boot`` bootstrap resamples of ``range(n_items)`` as index arrays.

    Without ``groups`` each resample draws ``n_items`` indices with replacement.  With
    ``groups`` (one label per item, e.g. the patient of each test image) it draws as many groups
    as there are, with replacement, and takes every item of each drawn group (cluster
    bootstrap), so a resample's size varies with the patients drawn.  Raises ValueError when
    ``groups`` does not have one label per item.
    """
    if groups is None:
        for _ in range(n_boot):
            yield rng.integers(0, n_items, n_items)
        return
    labels = np.asarray(groups)
    if len(labels) != n_items:
        raise ValueError(f"groups has {len(labels)} labels for {n_items} items; give one per item")
    _, inverse = np.unique(labels.astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(inverse))]
    members = [order[bounds[k]:bounds[k + 1]] for k in range(len(bounds) - 1)]
    sizes = np.diff(bounds)
    for _ in range(n_boot):
        picks = rng.integers(0, len(members), len(members))
        out = np.empty(int(sizes[picks].sum()), dtype=np.int64)
        at = 0
        for k in picks:
            out[at:at + sizes[k]] = members[k]
            at += sizes[k]
        yield out


def mcnemar_exact(better: int, worse: int) -> float:
    """Two-sided exact McNemar p-value for ``better`` images that only the variant got right and
    ``worse`` that only the baseline did (1.0 when there are none)."""
    if better + worse == 0:
        return 1.0
    return float(sps.binomtest(min(better, worse), better + worse, 0.5).pvalue)


def _cluster_sums(diffs: np.ndarray, groups: Sequence | np.ndarray | None) -> np.ndarray:
    if groups is None:
        return diffs
    labels = np.asarray(groups).astype(str)
    if len(labels) != len(diffs):
        raise ValueError(f"groups has {len(labels)} labels for {len(diffs)} differences; give one per image")
    _, inverse = np.unique(labels, return_inverse=True)
    return np.bincount(inverse, weights=diffs)


def sign_flip_test(diffs: Sequence[float] | np.ndarray, groups: Sequence | np.ndarray | None = None,
                   n_perm: int = N_PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided p-value of a paired sign-flip permutation test that the mean of ``diffs`` is 0.

    ``diffs`` holds one difference per image (variant minus baseline, e.g. seed-averaged
    correctness in [-1, 1]); with ``groups`` (each image's patient) the signs flip per patient,
    since a patient's films are not independent.  The statistic is the absolute total; the
    p-value counts sign patterns at least as extreme as the observed one (the observed pattern
    included, so it is never 0).  Exact up to :data:`EXACT_MAX` non-zero patients, else
    ``n_perm`` random patterns from ``seed``.  Returns 1.0 when every difference is 0.
    """
    sums = _cluster_sums(np.asarray(diffs, dtype=float), groups)
    sums = sums[np.abs(sums) > 1e-12]
    if len(sums) == 0:
        return 1.0
    observed = abs(sums.sum()) - 1e-9  # tolerance: equal totals count as "as extreme"
    if len(sums) <= EXACT_MAX:
        signs = np.array(list(product((1.0, -1.0), repeat=len(sums))))
        totals = np.abs(signs @ sums)
        return float((totals >= observed).mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(n_perm, len(sums)))
    totals = np.abs(signs @ sums)
    return float(((totals >= observed).sum() + 1) / (n_perm + 1))


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values (same order as given; NaN stays NaN and is not counted).

    The smallest of m p-values is multiplied by m, the next by m - 1, ..., with the running
    maximum taken so adjusted values never decrease, and capped at 1.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    if m == 0:
        return out
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def wilson(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion: ``successes`` of ``n`` distinct items (a
    seed-averaged count may be fractional); exact at 0 % and 100 %, NaN for n = 0."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must lie between 0 and n={n}")
    z = sps.norm.ppf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    if successes <= 0:
        low = 0.0
    if successes >= n:
        high = 1.0
    return float(low), float(high)


def per_image(frames: Sequence["pd.DataFrame"], value: str = "correct") -> "pd.DataFrame":
    """Average ``value`` per image over several seeds' tables (each with ``image_id`` and
    ``value``, optionally ``patient_id``): one row per distinct image with the mean, the number
    of seeds that scored it (``seeds``) and its patient (the image itself when unknown)."""
    import pandas as pd

    stacked = pd.concat([f.assign(image_id=f["image_id"].astype(str)) for f in frames], ignore_index=True)
    if "patient_id" not in stacked.columns:
        stacked["patient_id"] = stacked["image_id"]
    grouped = stacked.groupby("image_id", sort=False)
    out = grouped[value].mean().rename(value).to_frame()
    out["seeds"] = grouped.size()
    out["patient_id"] = grouped["patient_id"].first().astype(str)
    for column in stacked.columns:
        if column not in out.columns and column != value and column != "image_id":
            out[column] = grouped[column].first()
    return out.reset_index()


def mean_ci(values: Sequence[float] | np.ndarray, groups: Sequence | np.ndarray | None = None,
            n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-image ``values`` with a percentile bootstrap interval that resamples
    ``groups`` (patients) with all their images, or the images when no groups are given.
    Returns (mean, low, high); NaNs for no values."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = np.array([v[idx].mean() for idx in resample_indices(len(v), n_boot, rng, groups)])
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(low), float(high)


def proportion_ci(correct: Sequence[float] | np.ndarray, groups: Sequence | np.ndarray | None = None,
                  n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """A share of correct calls over distinct images (``correct`` per image, seed-averaged in
    [0, 1]) with an interval that is the wider of the patient cluster bootstrap and the Wilson
    interval over the distinct images: the bootstrap accounts for a patient's films agreeing,
    Wilson for a cell too small to bootstrap (one patient, or all right or all wrong).  Returns
    n (images), patients, correct (the seed-averaged count), accuracy, low, high."""
    c = np.asarray(correct, dtype=float)
    patients = len(set(map(str, groups))) if groups is not None else len(c)
    if len(c) == 0:
        return {"n": 0, "patients": 0, "correct": 0.0, "accuracy": float("nan"), "low": float("nan"),
                "high": float("nan")}
    mean, b_low, b_high = mean_ci(c, groups, n_boot, seed, level)
    w_low, w_high = wilson(float(c.sum()), len(c), level)
    return {"n": int(len(c)), "patients": int(patients), "correct": float(c.sum()), "accuracy": mean,
            "low": min(b_low, w_low), "high": max(b_high, w_high)}


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (scikit-learn's ``balanced_accuracy_score``)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return float("nan")
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


def soft_balanced_accuracy(y: np.ndarray, correct: np.ndarray) -> float:
    """Balanced accuracy from per-image (seed-averaged) correctness: the mean over the classes
    present of each class's mean correctness."""
    y, correct = np.asarray(y), np.asarray(correct, dtype=float)
    if len(y) == 0:
        return float("nan")
    return float(np.mean([correct[y == c].mean() for c in np.unique(y)]))


def balanced_accuracy_ci(y: np.ndarray, correct: np.ndarray, groups: Sequence | np.ndarray | None,
                         n_boot: int = N_BOOTSTRAP, seed: int = 0, level: float = CI_LEVEL,
                         reference: np.ndarray | None = None) -> tuple[float, float, float]:
    """:func:`soft_balanced_accuracy` (minus that of ``reference`` correctness on the same images,
    for a paired difference) with a percentile bootstrap interval resampling ``groups``
    (patients) with all their images.  Returns (value, low, high)."""
    y, correct = np.asarray(y), np.asarray(correct, dtype=float)

    def score(idx: np.ndarray) -> float:
        value = soft_balanced_accuracy(y[idx], correct[idx])
        return value - soft_balanced_accuracy(y[idx], reference[idx]) if reference is not None else value

    everything = np.arange(len(y))
    rng = np.random.default_rng(seed)
    draws = np.array([score(idx) for idx in resample_indices(len(y), n_boot, rng, groups)])
    draws = draws[np.isfinite(draws)]
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2]) if len(draws) else (np.nan, np.nan)
    return score(everything), float(low), float(high)


#: Fewest seeds from which an interval over seeds is given and read.  With two, the t quantile is
#: 12.7 and the interval nearly always spans the metric's whole range, so it can never exclude 0:
#: a verdict that needs it would say "not distinguishable" from a test that could not have said more.
MIN_SEEDS = 3
#: Fewest distinct images and patients a table cell needs to be read (below: ``inconclusive``).
MIN_CELL_IMAGES = 10
MIN_CELL_PATIENTS = 5


def conclusive(n: int | float, patients: int | float) -> bool:
    """Whether a cell of ``n`` distinct images of ``patients`` patients is large enough to read
    (:data:`MIN_CELL_IMAGES`, :data:`MIN_CELL_PATIENTS`)."""
    return bool(n >= MIN_CELL_IMAGES and patients >= MIN_CELL_PATIENTS)


def undetermined(seeds: int) -> str:
    """The verdict of a comparison over too few seeds to read a seed interval."""
    return f"undetermined ({seeds} seed{'s' if seeds != 1 else ''})"


#: Significance level of a verdict, applied to Holm-adjusted p-values within a family.
ALPHA = 0.05
#: The verdicts of a paired comparison (besides :func:`nbhelpers.evaluation.stats.undetermined`).
BETTER, WORSE, SAME = "better", "worse", "not distinguishable"


def verdict(seeds: int, p_holm: float, seed_low: float, seed_high: float, diff: float) -> str:
    """A variant against its baseline: :data:`BETTER` or :data:`WORSE` when the Holm-adjusted p
    is below :data:`ALPHA` *and* the seed interval excludes 0; :data:`SAME` when either says no;
    "undetermined (n seeds)" with fewer than :data:`MIN_SEEDS` seeds,
    where no seed interval exists, so the verdict cannot depend on how many seeds happened to run."""
    if seeds < MIN_SEEDS or not (np.isfinite(seed_low) and np.isfinite(seed_high)):
        return undetermined(seeds)
    if p_holm < ALPHA and (seed_low > 0 or seed_high < 0):
        return BETTER if diff > 0 else WORSE
    return SAME


def t_interval(values: np.ndarray, bounds: tuple[float, float], level: float = CI_LEVEL) -> tuple[float, float]:
    """The ``level`` t-interval of the mean of ``values`` (e.g. one metric over seeds), cut to the
    metric's possible ``bounds``; NaNs (shown as "—") for fewer than :data:`MIN_SEEDS` values."""
    if len(values) < MIN_SEEDS:
        return float("nan"), float("nan")
    half = sps.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(max(values.mean() - half, bounds[0])), float(min(values.mean() + half, bounds[1]))


def paired_comparison(diff: np.ndarray, patients: Sequence | np.ndarray, rng: np.random.Generator,
                      n_boot: int = N_BOOTSTRAP, boot_seed: int = 0, level: float = CI_LEVEL) -> dict[str, object]:
    """The statistics of one variant against its baseline from ``diff`` (seeds x images, each
    entry variant's correctness minus baseline's on one image, in {-1, 0, 1}) and each image's
    patient: the mean difference (``accuracy_diff``), its t-interval over seeds (``seed_ci_*``,
    seed noise), a bootstrap interval of the seed-averaged difference resampling patients
    (``bootstrap_ci_*``, test-set noise), the distinct images on which the variant is right more
    or less often (``variant_better`` / ``variant_worse``), the sign-flip p-value over patients
    (``p_value``, its Monte Carlo draws seeded by ``boot_seed``) and McNemar's exact p-value of
    each seed on its own (``mcnemar_p_seeds``).  The bootstrap draws from ``rng``: one generator
    passed through a family's comparisons in turn."""
    diff = np.asarray(diff, dtype=float)
    patients = np.asarray(patients)
    per_seed, per_image = diff.mean(axis=1), diff.mean(axis=0)  # per image: each image once
    boot = np.array([per_image[idx].mean() for idx in resample_indices(len(per_image), n_boot, rng, patients)])
    seed_low, seed_high = t_interval(per_seed, (-1.0, 1.0), level)
    boot_low, boot_high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    mcnemar = [mcnemar_exact(int((d == 1).sum()), int((d == -1).sum())) for d in diff]
    return {"seeds": diff.shape[0], "test_images": diff.shape[1], "test_patients": len(set(patients.tolist())),
            "accuracy_diff": per_seed.mean(), "seed_ci_low": seed_low, "seed_ci_high": seed_high,
            "bootstrap_ci_low": float(boot_low), "bootstrap_ci_high": float(boot_high),
            "variant_better": int((per_image > 0).sum()), "variant_worse": int((per_image < 0).sum()),
            "p_value": sign_flip_test(per_image, patients, seed=boot_seed),
            "mcnemar_p_seeds": " ".join(f"{p:.3g}" for p in mcnemar)}


def judge_families(table: "pd.DataFrame", family: str) -> "pd.DataFrame":
    """``table`` (rows of :func:`paired_comparison`) with ``p_holm`` (Holm within each ``family``
    column value), ``verdict`` (:func:`verdict`) and ``distinguishable`` (better or worse)."""
    if table.empty:
        return table
    table = table.copy()
    table["p_holm"] = np.nan
    for _, part in table.groupby(family, sort=False):
        table.loc[part.index, "p_holm"] = holm(part["p_value"].to_numpy())
    table["verdict"] = [verdict(r.seeds, r.p_holm, r.seed_ci_low, r.seed_ci_high, r.accuracy_diff)
                        for r in table.itertuples(index=False)]
    table["distinguishable"] = table["verdict"].isin([BETTER, WORSE])
    return table
