"""Paths from forms, the command line and config files: normalized, validated, confined.

A path is accepted only when it is absolute, has no ``.`` or ``..`` component,
and every component uses a conservative character set (letters, digits,
``_ + - .``; ``.`` and ``..`` themselves are refused, a hidden directory like ``.demo`` is not). Nothing else can smuggle a shell
metacharacter, a newline or a traversal into a command or a config file.

Restore destinations must lie strictly below one of the cluster's
``restore_roots``, after symlinks are resolved: a link inside a root that
points elsewhere does not make elsewhere a root.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from pgdr.errors import RestoreRefused, UsageError

log = logging.getLogger(__name__)
COMPONENT = r"[A-Za-z0-9_.+-]+"  # "." and ".." are refused before this applies
SAFE_PATH = re.compile(rf"^(/{COMPONENT})+$")
MAX_PATH = 1024


def check_path(text, what: str = "path") -> Path:
    """An absolute, normalized path of safe characters, or UsageError naming what is wrong."""
    if text is None or not isinstance(text, (str, os.PathLike)):
        raise UsageError(f"{what}: a path is required, got {text!r}")
    s = os.fspath(text)
    if not s.startswith("/"):
        raise UsageError(f"{what} {s!r} is not an absolute path")
    if len(s) > MAX_PATH:
        raise UsageError(f"{what} is longer than {MAX_PATH} characters")
    trimmed = s.rstrip("/") if s != "/" else s
    parts = trimmed.split("/")[1:]
    if any(p in (".", "..") for p in parts):
        raise UsageError(f"{what} {s!r} contains '.' or '..'; give the plain absolute path")
    if "//" in trimmed:
        raise UsageError(f"{what} {s!r} contains an empty component ('//')")
    if not SAFE_PATH.fullmatch(trimmed):
        bad = sorted({c for c in s if not re.match(r"[A-Za-z0-9_.+/-]", c)})
        shown = " ".join(repr(c) for c in bad)
        raise UsageError(f"{what} {s!r} has characters pgdr does not accept in paths ({shown}); "
                         "use letters, digits, '_', '+', '-' and '.'")
    return Path(trimmed)


def check_roots(roots) -> tuple[str, ...]:
    return tuple(str(check_path(r, "restore_roots entry")) for r in roots)


def confine(pgdata, roots, what: str = "pgdata") -> Path:
    """``pgdata`` validated and strictly inside one of ``roots`` (symlinks resolved on both sides)."""
    path = check_path(pgdata, what)
    if not roots:
        raise RestoreRefused(f"{what} {path}: this cluster has no restore_roots configured; nothing was touched")
    real = Path(os.path.realpath(path))
    for root in roots:
        real_root = Path(os.path.realpath(root))
        if real != real_root and real_root in real.parents:
            _warn_if_shared(real_root)
            return path
    listed = ", ".join(str(r) for r in roots)
    resolved = f" (resolves to {real})" if real != path else ""
    raise RestoreRefused(f"{what} {path}{resolved} is outside this cluster's restore_roots ({listed}); "
                         "restores and replaces only go below those directories; nothing was touched")


def _warn_if_shared(root: Path) -> None:
    """A root others can write into lets them swap a path for a link between pgdr's check and its use."""
    try:
        mode = root.stat().st_mode
    except OSError:
        return
    if mode & 0o022:
        log.warning("restore root %s is writable by group or others: another local user could race pgdr with a "
                    "symlink there; give restores a directory only root (or run_as) can write into", root)


def roots_pattern(roots) -> str:
    """A JSON-schema ``pattern`` accepting exactly the safe paths strictly below one of ``roots``
    (the form's first line of defence; the core checks again, symlinks included)."""
    # Roots passed check_path: of their characters only '.' and '+' are special, in Python and in the
    # browser's (ECMAScript, unicode mode) regex alike; re.escape would also escape '-', which JS refuses.
    alts = "|".join(str(r).rstrip("/").replace(".", r"\.").replace("+", r"\+") for r in roots) or "(?!)"
    component = rf"(?!\.\.?(?:/|$)){COMPONENT}"  # the form has no separate '.'/'..' check: refuse them here
    return rf"^(?:{alts})(?:/{component})+$"
