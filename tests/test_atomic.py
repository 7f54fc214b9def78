from __future__ import annotations

import errno
import subprocess
import sys
import textwrap

import pytest

from data_prep import atomic


def test_a_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    atomic.write_text(target, "a,b\n1,2\n")
    assert target.read_text() == "a,b\n1,2\n"
    atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["table.csv"]  # no temporary left behind


def test_a_process_killed_before_the_rename_leaves_the_old_file(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"good checkpoint")
    script = textwrap.dedent(f"""
        import os
        from data_prep import atomic
        atomic.BEFORE_REPLACE = lambda tmp: os._exit(9)   # killed between write and rename
        atomic.write_bytes({str(target)!r}, b"half")
    """)
    done = subprocess.run([sys.executable, "-c", script])
    assert done.returncode == 9
    assert target.read_bytes() == b"good checkpoint"


def test_an_error_while_writing_a_set_leaves_the_old_set(tmp_path):
    a, b = tmp_path / "manifest.csv", tmp_path / "summary.json"
    atomic.replace_together({a: lambda p: p.write_text("m1"), b: lambda p: p.write_text("s1")})
    assert (a.read_text(), b.read_text()) == ("m1", "s1")

    def broken(path):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic.replace_together({a: lambda p: p.write_text("m2"), b: broken})
    assert (a.read_text(), b.read_text()) == ("m1", "s1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv", "summary.json"]


def test_a_full_disk_is_one_line_naming_the_path(tmp_path):
    target = tmp_path / "best.pt"

    def full(path):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: "
                           "No space left on device")

    with pytest.raises(atomic.WriteError, match=rf"no space left on the device while writing {target}"):
        atomic.write_with(target, full)

    def denied(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(atomic.WriteError, match="no space left"):
        atomic.replace_together({target: denied})
    assert not target.exists()
