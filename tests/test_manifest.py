"""One manifest reader for every command: bad manifests stop with one line before any work."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import real_manifest

from data_prep.manifest import ManifestError, read_manifest
from data_prep.split import LeakError
from nbhelpers.tools import cli


def _good() -> pd.DataFrame:
    return pd.DataFrame({"image_id": ["a", "b", "c"], "path": ["x/a.png", "x/b.png", "x/c.png"],
                         "label": ["covid", "normal", "pneumonia"], "split": ["train", "val", "test"],
                         "patient_id": ["p1", "p2", "p3"]})


@pytest.mark.parametrize("case, change, message", [
    ("no label column", lambda t: t.drop(columns="label"), r"lacks column\(s\) \['label'\]"),
    ("no split column", lambda t: t.drop(columns="split"), r"lacks column\(s\) \['split'\]"),
    ("label covid19", lambda t: t.assign(label=["covid19", "normal", "pneumonia"]), r"label outside .*'covid19'"),
    ("label Covid", lambda t: t.assign(label=["Covid", "normal", "pneumonia"]), r"label outside .*'Covid'"),
    ("empty label", lambda t: t.assign(label=["", "normal", "pneumonia"]), r"label outside .*''"),
    ("split holdout", lambda t: t.assign(split=["train", "holdout", "test"]), r"split outside .*'holdout'"),
])
def test_a_bad_manifest_is_one_line_naming_the_problem(tmp_path, case, change, message):
    path = tmp_path / "manifest.csv"
    change(_good()).to_csv(path, index=False)
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)
    read_manifest(_good())  # and the good one passes


def test_an_empty_or_missing_manifest_and_a_missing_path_column(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(ManifestError, match="is empty"):
        read_manifest(empty)
    with pytest.raises(FileNotFoundError, match="curate the data first"):
        read_manifest(tmp_path / "nowhere.csv")
    with pytest.raises(ManifestError, match=r"lacks column\(s\) \['path'\]"):
        read_manifest(_good().drop(columns="path"), ("path",))


@pytest.mark.parametrize("leak", ["one image in train and test", "two ids for one file"])
def test_a_manifest_that_would_test_on_training_images_is_refused(leak):
    table = _good()
    if leak == "one image in train and test":
        table = pd.concat([table, table.iloc[[0]].assign(split="test")], ignore_index=True)
        table.loc[3, "patient_id"] = "p9"  # even under another patient id
    else:
        table.loc[2, "path"] = "x/a.png"  # the test row is the training file under another id
    with pytest.raises(LeakError, match="more than one split"):
        read_manifest(table)


@pytest.mark.parametrize("command", ["train", "grid"])
@pytest.mark.parametrize("bad", ["empty", "label covid19", "leak"])
def test_train_and_grid_stop_with_exit_2_and_one_line(data_dir, tmp_path, capsys, command, bad):
    path = tmp_path / "manifest.csv"
    table = real_manifest(data_dir, 4, ["train", "train", "val", "test"])
    if bad == "empty":
        path.write_bytes(b"")
    elif bad == "label covid19":
        table.assign(label=table["label"].replace("covid", "covid19")).to_csv(path, index=False)
    else:
        pd.concat([table, table.iloc[[0]].assign(split="test", image_id="copy")]).to_csv(path, index=False)
    args = (["train", "--model", "mobilenetv2", "--preset", "smoke"] if command == "train" else
            ["grid", "--groups", "clahe", "--preset", "smoke", "--seeds", "0"])
    code = cli.main(args + ["--manifest", str(path), "--data-dir", str(data_dir), "--out", str(tmp_path / "out"),
                            "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert {"empty": "is empty", "label covid19": "covid19", "leak": "more than one split"}[bad] in err


def test_a_source_image_replaced_after_curation_is_refused_at_the_cache(data_dir, tmp_path):
    import shutil

    from data_prep.fingerprint import sha256_file
    from nbhelpers.pipeline.cache import SourceChangedError, build_cache
    from nbhelpers.pipeline.preprocess import PreprocessConfig

    table = real_manifest(data_dir, 2, ["train", "val"])
    root = tmp_path / "data"
    for rel in table["path"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / rel, root / rel)
    table["sha256"] = [sha256_file(root / rel) for rel in table["path"]]
    cfg = PreprocessConfig(size=32)
    build_cache(table, root, tmp_path / "cache", cfg, progress=False)  # as curated: built
    first, second = table["path"].iloc[0], table["path"].iloc[3]
    shutil.copy(data_dir / second, root / first)  # another film under the curated name
    with pytest.raises(SourceChangedError, match=r"1 of 6 source image\(s\) changed since curation.*curate again"):
        build_cache(table, root, tmp_path / "cache2", cfg, progress=False)
    assert not (tmp_path / "cache2").exists()  # refused before anything was written


def test_a_full_disk_is_one_line_and_leaves_no_half_built_cache(data_dir, tmp_path, monkeypatch):
    """The memory-mapped write used to die with SIGBUS (exit 135) and leave `.KEY.building-PID`."""
    import errno
    import os

    from nbhelpers.pipeline.cache import CacheError, build_cache
    from nbhelpers.pipeline.preprocess import PreprocessConfig

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    root = tmp_path / "cache"
    with pytest.raises(CacheError, match=r"no room for the image cache .*No space left on device.*free disk space"):
        build_cache(real_manifest(data_dir, 2, ["train", "val"]), data_dir, root, PreprocessConfig(size=32),
                    progress=False)
    assert list(root.iterdir()) == []  # no .KEY.building-PID folder left


def test_the_temporary_files_of_a_killed_write_are_cleaned_when_the_folder_is_held_again(tmp_path):
    from nbhelpers.training.checkpoint import hold_run_folder

    run = tmp_path / "run"
    run.mkdir()
    (run / ".last.pt.abc123.tmp").write_bytes(b"x" * 1000)  # a write killed half-way
    (run / "last.pt").write_bytes(b"whole")
    with hold_run_folder(run):
        assert not list(run.glob(".*.tmp")) and (run / "last.pt").read_bytes() == b"whole"
