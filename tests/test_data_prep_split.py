"""Patient-grouped, class-stratified splits and the leak check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_prep.schema import CLASSES, SPLITS
from data_prep.split import LeakError, allocate, check_no_leak, kfold_by_patient, split_by_patient


def make_table(seed: int = 0, patients_per_class: int = 120) -> pd.DataFrame:
    """Patients with 1-6 films each (like ieee8023 follow-ups), three classes."""
    rng = np.random.default_rng(seed)
    rows = []
    for cls in CLASSES:
        for p in range(patients_per_class):
            for film in range(int(rng.choice([1, 1, 1, 2, 3, 6]))):
                rows.append({"image_id": f"{cls}-{p}-{film}", "patient_id": f"src:{cls}-{p}", "label": cls,
                             "sha256": f"{cls}{p}{film}"})
    return pd.DataFrame(rows)


def test_no_patient_in_two_splits_and_ratios_close() -> None:
    df = make_table()
    split = split_by_patient(df, (0.7, 0.1, 0.2), seed=0)
    assert set(split) == set(SPLITS)
    assert (df.assign(split=split).groupby("patient_id")["split"].nunique() == 1).all()
    for cls in CLASSES:
        share = split[df["label"] == cls].value_counts(normalize=True)
        assert share["train"] == pytest.approx(0.7, abs=0.03)
        assert share["val"] == pytest.approx(0.1, abs=0.03)
        assert share["test"] == pytest.approx(0.2, abs=0.03)
    check_no_leak(df.assign(split=split))


def test_singletons_hit_the_paper_sizes_exactly() -> None:
    df = pd.DataFrame({"patient_id": [f"p{i}" for i in range(1425)], "label": [c for c in CLASSES for _ in range(475)]})
    sizes = split_by_patient(df).value_counts()
    # per class 475 -> 332/48/95 (largest remainder); the paper's 993/144/288 rounds differently.
    assert sizes.to_dict() == {"train": 996, "val": 144, "test": 285}


def test_split_is_deterministic_and_seed_dependent() -> None:
    df = make_table()
    first = split_by_patient(df, seed=3)
    assert first.equals(split_by_patient(df.copy(), seed=3))
    assert not first.equals(split_by_patient(df, seed=4))


def test_kfold_groups_patients_and_balances_folds() -> None:
    df = make_table(patients_per_class=60)
    folds = kfold_by_patient(df, k=5, seed=0)
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]
    assert (df.assign(fold=folds).groupby("patient_id")["fold"].nunique() == 1).all()
    per_class = pd.crosstab(df["label"], folds)
    assert (per_class.max(axis=1) - per_class.min(axis=1) <= 6).all()  # within one large patient
    with pytest.raises(ValueError, match="k=1"):
        kfold_by_patient(df, k=1)


def test_leak_check_catches_patient_and_image_leaks() -> None:
    df = make_table().assign(split="train")
    df.loc[df.index[-1], "split"] = "test"  # the last patient's last film goes elsewhere
    df.loc[df.index[-1], "patient_id"] = df.loc[df.index[-1], "patient_id"] + " "  # stray whitespace
    with pytest.raises(LeakError, match="patient.*train\\+test|patient.*test\\+train"):
        check_no_leak(df)
    leak = pd.DataFrame({"patient_id": ["a", "b"], "label": ["covid", "covid"], "sha256": ["x", "x"], "split": ["train", "test"]})
    with pytest.raises(LeakError, match="image sha256"):
        check_no_leak(leak)


def test_bad_ratios_and_columns_are_rejected() -> None:
    df = make_table()
    with pytest.raises(ValueError, match="ratios"):
        split_by_patient(df, (0.7, 0.2, 0.2))
    with pytest.raises(KeyError, match="patient_id"):
        split_by_patient(df.drop(columns="patient_id"))


def test_allocate_sums_to_total() -> None:
    assert allocate(475, (0.7, 0.1, 0.2)) == [332, 48, 95]
    assert sum(allocate(17, (1 / 3, 1 / 3, 1 / 3))) == 17
