"""Kaggle API credentials, found where the Kaggle client looks for them and never shown.

The order is the client's: ``$KAGGLE_USERNAME`` with ``$KAGGLE_KEY``; then ``kaggle.json`` in
``$KAGGLE_CONFIG_DIR`` when that is set, else in ``~/.kaggle`` and then ``~/.config/kaggle``
(``$XDG_CONFIG_HOME/kaggle``).  Messages name the place a token was looked for or read from,
never its content.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.errors import WorkbookError

TOKEN_PAGE = "https://www.kaggle.com/settings"
TOKEN_FILE = "kaggle.json"


class CredentialsError(WorkbookError, PermissionError):
    """Kaggle credentials are missing or unreadable; the message says where to put them."""


@dataclass(frozen=True)
class KaggleCredentials:
    """A Kaggle user name and API key, and where they were read (an environment variable or a
    file).  The key is left out of ``repr`` so that it cannot end up in a log or a traceback."""

    username: str
    key: str = field(repr=False)
    origin: str = ""

    def authorization(self) -> str:
        """The HTTP Basic ``Authorization`` header value of these credentials."""
        return "Basic " + base64.b64encode(f"{self.username}:{self.key}".encode()).decode("ascii")

    def secrets(self) -> tuple[str, str]:
        """The strings a message must never contain: the key and the header built from it."""
        return self.key, self.authorization().removeprefix("Basic ")


def token_files() -> list[Path]:
    """Where ``kaggle.json`` is looked for, in order."""
    configured = os.environ.get("KAGGLE_CONFIG_DIR")
    if configured:
        return [Path(configured).expanduser() / TOKEN_FILE]
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [Path.home() / ".kaggle" / TOKEN_FILE, xdg / "kaggle" / TOKEN_FILE]


def kaggle_credentials() -> KaggleCredentials:
    """Return the Kaggle credentials of this machine (see the module docstring for the order).

    Raises :class:`CredentialsError` naming where to put a token when none is found, and naming
    the file (not its content) when it is not a JSON object with ``username`` and ``key``.
    """
    user, key = os.environ.get("KAGGLE_USERNAME", ""), os.environ.get("KAGGLE_KEY", "")
    if user and key:
        return KaggleCredentials(user, key, "$KAGGLE_USERNAME/$KAGGLE_KEY")
    candidates = token_files()
    for path in candidates:
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise CredentialsError(
                f"cannot read the Kaggle token {path} ({type(err).__name__}); download a new one at "
                f"{TOKEN_PAGE} (API > Create New Token) and save it there"
            ) from None
        if not isinstance(data, dict) or not data.get("username") or not data.get("key"):
            raise CredentialsError(
                f"the Kaggle token {path} lacks \"username\" or \"key\"; download a new one at {TOKEN_PAGE} "
                "(API > Create New Token) and save it there"
            )
        return KaggleCredentials(str(data["username"]), str(data["key"]), str(path))
    raise CredentialsError(
        f"RSNA comes from Kaggle and needs an API token: create one at {TOKEN_PAGE} (API > Create New "
        f"Token) and save it as {candidates[0]}, or set KAGGLE_USERNAME and KAGGLE_KEY"
    )
