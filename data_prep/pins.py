"""The kinds of upstream pin: a GitHub repository at a commit (:class:`GitSnapshot`, carried by each
GitHub source's entry in :data:`data_prep.sources.SOURCES`; :func:`data_prep.sources.pinned`
lists them), the metadata files that a library ships in its wheel (:data:`PACKAGED`), and the
films of a source that another repository vendors (:data:`SUBSETS`)."""

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


@dataclass(frozen=True)
class PackagedFile:
    """An upstream metadata file that a PyPI package ships (gzip'd) inside its wheel: the package,
    the version checked, the member below the package folder, the file name in the source folder,
    and the SHA-256 and data row count of the unpacked file."""

    package: str
    version: str
    member: str
    name: str
    sha256: str
    rows: int


#: Metadata that a library ships, so nobody has to fetch it by hand.  NIH publishes
#: Data_Entry_2017_v2020.csv only behind its Box web page; torchxrayvision's wheel carries the
#: same file (the mirror's NIH rows are byte-identical lines of it).
PACKAGED: dict[str, PackagedFile] = {
    "nih": PackagedFile(
        "torchxrayvision", "1.5.7", "data/Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017_v2020.csv",
        "dc1d2df67fdc1c5a7601d48699cda2b13dc2c4841488b4183dcf04884dbaca11", 112120,
    ),
}


@dataclass(frozen=True)
class VendoredSubset:
    """Films of a source that a public GitHub repository vendors under their upstream names: the
    repository at a pinned commit, the folders (inside its archive, below the top folder) that hold
    the films, how many films and the SHA-256 of their sorted names (one per line, newline-ended),
    and the SHA-256 of the source's own metadata (:data:`PACKAGED`) cut to the rows of those
    films, in the source's order.  The image bytes themselves are not pinned (no upstream
    checksum list exists); the archive's whole gzip stream is checked instead."""

    repo: str
    commit: str
    folders: tuple[str, ...]
    count: int
    names_sha256: str
    rows_sha256: str


#: A credential-free teaching set of NIH ChestX-ray14: the 500 'No Finding' and 500 'Pneumonia'
#: films vendored by the DarkCovidNet repository, with NIH's own rows for them (patient, age, sex,
#: view).  The development mirror's ``nih-cxr14-subset`` holds the same names and rows.
SUBSETS: dict[str, VendoredSubset] = {
    "nih": VendoredSubset(
        "muhammedtalo/COVID-19", "ee3e2cff",
        ("X-Ray Image DataSet/No_findings", "X-Ray Image DataSet/Pneumonia"), 1000,
        "d34d392db18ea3dda20256a6e62deac4541bdef5e9b2870afe06cb4c7edc4c5d",
        "b7de94d53e91a75696c3c6d8ebab5f4516bf989ef4fdb8d7ffee7005d8d1c73d",
    ),
}
