"""The upstream versions the workbook was built against: each GitHub source at a pinned commit,
with the SHA-256 and data row count of its metadata file."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GitSnapshot:
    """A GitHub repository at a pinned commit, and the file whose hash (and data row count) proves
    the right version; the row count tells a truncated copy from a newer one."""

    repo: str
    commit: str
    check_file: str
    check_sha256: str
    check_rows: int | None = None


#: The commits of the development mirror (see its SOURCES.md), the SHA-256 of their metadata and its
#: number of data rows (data_prep.sources warns when a metadata file differs from its pin).
PINNED: dict[str, GitSnapshot] = {
    "ieee8023": GitSnapshot(
        "ieee8023/covid-chestxray-dataset", "584034aa", "metadata.csv",
        "e46ffab4cdeb4866491d32afe466baefd7acbcf268a75c260f81d8520b8664a0", 751,
    ),
    "figure1": GitSnapshot(
        "agchung/Figure1-COVID-chestxray-dataset", "95bb569e", "metadata.csv",
        "c4a6313343797ed8f052d2887e451013f93ecc8ebec4b05d0f1bb6d2eee42db7", 55,
    ),
    "actualmed": GitSnapshot(
        "agchung/Actualmed-COVID-chestxray-dataset", "27240dd8", "metadata.csv",
        "df7d0b406282d9b8e7163316c9028410f50502ea55159863d798bc6e0c35e10e", 238,
    ),
}
