"""Progress bars that suit where the code runs: live in JupyterLab and terminals, one line headless.

``from data_prep.progress import tqdm`` is used instead of ``tqdm.auto`` everywhere.  It is
``tqdm.auto.tqdm`` (a widget in JupyterLab, a text bar in a terminal) unless the environment
variable ``CXR_PROGRESS`` is ``quiet``: then a bar prints nothing while it runs and one line when
it closes (``preprocessing 64px: 36 img in 2.1 s``), and bars opened with ``leave=False`` (the
batches inside an epoch) print nothing at all.  The workbook runner sets ``quiet`` for the
notebooks it executes headlessly, so an executed notebook holds a few readable lines instead of
hundreds of redrawn bars.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

#: The environment variable that selects the progress style, and its quiet value.
PROGRESS_ENV = "CXR_PROGRESS"
QUIET = "quiet"


def quiet() -> bool:
    """True when progress should be one closing line per bar (``CXR_PROGRESS=quiet``)."""
    return os.environ.get(PROGRESS_ENV, "").strip().lower() == QUIET


class QuietBar:
    """The part of tqdm's interface the project uses, printing one line when the bar closes."""

    def __init__(self, iterable: Iterable | None = None, desc: str | None = None, total: int | None = None,
                 unit: str = "it", leave: bool | None = True, disable: bool | None = False, initial: int = 0,
                 file: Any = None, **_: Any) -> None:
        self.iterable, self.desc, self.unit, self.file = iterable, desc or "", unit, file
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self._initial = initial, initial
        self._silent = bool(disable) or leave is False
        self._start, self._closed = time.perf_counter(), False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.n += 1
        finally:
            self.close()

    def __enter__(self) -> "QuietBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *_: Any, **__: Any) -> None:
        pass

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._silent or self.n == self._initial:
            return
        count = f"{self.n}/{self.total}" if self.total is not None and self.total != self.n else f"{self.n}"
        label = f"{self.desc}: " if self.desc else ""
        print(f"{label}{count} {plural(self.unit, self.n)} in {time.perf_counter() - self._start:.1f} s",
              file=self.file or sys.stdout, flush=True)

    @staticmethod
    def write(text: str, **_: Any) -> None:
        print(text, file=sys.stdout, flush=True)


def plural(unit: str, n: int) -> str:
    """``unit`` for ``n`` things: "1 image", "8 epochs", "3 batches" ("B" and "it" stay as they are)."""
    if n == 1 or unit in ("B", "it") or unit.endswith("s"):
        return unit
    return {"batch": "batches"}.get(unit, f"{unit}s")


def tqdm(*args: Any, **kwargs: Any):
    """A progress bar: :class:`QuietBar` when :func:`quiet`, else ``tqdm.auto.tqdm``."""
    if quiet():
        return QuietBar(*args, **kwargs)
    from tqdm.auto import tqdm as live

    return live(*args, **kwargs)


def write(text: str) -> None:
    """Print ``text`` without breaking a live bar."""
    if quiet():
        QuietBar.write(text)
    else:
        from tqdm.auto import tqdm as live

        live.write(text)


tqdm.write = write  # type: ignore[attr-defined]  # tqdm.write(...) works on the factory as on the class


#: Where :func:`timed` records ``(stage, seconds, items)``; None (the default): nowhere.  A benchmark
#: sets a list here to learn what each stage of a long job cost.
STAGES: list[tuple[str, float, int]] | None = None


@contextmanager
def timed(stage: str, items: int = 0) -> Iterator[None]:
    """Time the block as ``stage`` (over ``items`` things) into :data:`STAGES` when it is a list."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if STAGES is not None:
            STAGES.append((stage, time.perf_counter() - start, items))
