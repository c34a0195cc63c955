"""Push mode without one interpreter start per segment.

PostgreSQL's archiver runs ``archive_command`` once per segment, one at a time.
When ``pgdr wal-push`` is called for a segment of a server that has more
segments waiting (``pg_wal/archive_status/*.ready``), it pushes the next ones
too, in parallel, and after each upload has returned (durable: fsync and
rename, or a completed PUT) it leaves a marker ``pg_wal/.pgdr-pushed/<segment>``
holding the segment's SHA-256. The archiver's next calls are answered by
``answer_from_marker`` before anything heavy is imported: exit 0 only when the
marker names the same cluster and configuration and the file's SHA-256 equals
the one archived. Anything else (no marker, a different file, a flag it does
not know) takes the normal path, which is always safe.

This module imports only the standard library: it runs on every archive_command call.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

MARKER_DIR = ".pgdr-pushed"
_SEGMENT = re.compile(r"^[0-9A-F]{24}$")
_FAST_FLAGS = {"-q", "--quiet"}  # flags the fast path understands besides --config and --cluster


def push_identity(cluster: str, config: str | None) -> str:
    """Who archived: the cluster and the configuration file (a marker from another config is ignored)."""
    config = config or os.environ.get("PGDR_CONFIG") or ""
    return f"{cluster}|{os.path.abspath(config) if config else ''}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _parse(argv: list[str]):
    """(cluster, config, path) of a plain ``[--config C] [-q] wal-push --cluster X PATH``, else None."""
    cluster = config = None
    rest = []
    it = iter(argv)
    for a in it:
        if a in ("--config", "--cluster"):
            value = next(it, None)
            if value is None:
                return None
            config, cluster = (value, cluster) if a == "--config" else (config, value)
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
        elif a.startswith("--cluster="):
            cluster = a.split("=", 1)[1]
        elif a in _FAST_FLAGS:
            continue
        elif a == "--batch":  # wal-push's own option: no bearing on the answer
            if next(it, None) is None:
                return None
        elif a.startswith("--batch="):
            continue
        elif a.startswith("-"):
            return None  # --json and anything else: the full command answers
        else:
            rest.append(a)
    if len(rest) != 2 or rest[0] != "wal-push" or not cluster:
        return None
    return cluster, config, rest[1]


def answer_from_marker(argv: list[str]) -> bool:
    """True when this ``wal-push`` call is for a segment a batch already archived, verified."""
    parsed = _parse(argv)
    if parsed is None:
        return False
    cluster, config, path = parsed
    path = Path(path)
    if not _SEGMENT.match(path.name):
        return False
    marker = path.absolute().parent / MARKER_DIR / path.name
    try:
        meta = json.loads(marker.read_text())
        if meta.get("identity") != push_identity(cluster, config) or meta.get("sha256") != _sha256(path):
            return False
    except (OSError, ValueError, AttributeError):
        return False
    try:
        marker.unlink()
    except OSError:
        pass
    if "-q" not in argv and "--quiet" not in argv:
        print(f"pgdr: {path.name} was archived by an earlier batch ({meta.get('key')}); verified", file=sys.stderr)
    return True


def answer_push(argv: list[str]) -> int | None:
    """pgdr.fast's hook: 0 for a segment a batch already archived (verified), else None (the full command)."""
    return 0 if answer_from_marker(argv) else None


def push_ready_batch(archive, path: str | os.PathLike, count: int, identity: str) -> list[str]:
    """Archive up to ``count`` segments PostgreSQL marked ready after ``path``, in parallel, each
    followed by its marker. A failure only means that segment takes the normal path later."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    from pgdr.errors import PgdrError
    from pgdr.wal import require_supported_segment_size, segment_size_of_file

    log = logging.getLogger(__name__)
    path = Path(path).absolute()
    pg_wal = path.parent
    status = pg_wal / "archive_status"
    if count <= 0 or pg_wal.name != "pg_wal" or not status.is_dir():
        return []
    ready = sorted(p.name[: -len(".ready")] for p in status.glob("*.ready"))
    todo = [n for n in ready if _SEGMENT.match(n) and n > path.name][:count]
    markers = pg_wal / MARKER_DIR
    markers.mkdir(exist_ok=True)
    for old in markers.iterdir():  # markers PostgreSQL will never ask about again
        if old.name not in ready and not old.name.startswith("."):
            old.unlink(missing_ok=True)

    def one(name: str) -> str | None:
        if (markers / name).exists():
            return None
        seg = pg_wal / name
        try:
            require_supported_segment_size(segment_size_of_file(seg), str(seg))
            result = archive.push(seg)
        except (PgdrError, OSError) as e:
            log.warning("batch: %s left for its own archive_command call: %s", name, e)
            return None
        tmp = markers / f".{name}.tmp"
        with open(tmp, "w") as f:
            json.dump({"identity": identity, "sha256": result.sha256, "key": result.key}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, markers / name)
        return name

    with ThreadPoolExecutor(max_workers=min(len(todo), 8) or 1) as pool:
        done = [n for n in pool.map(one, todo) if n]
    if done:
        log.info("batch: archived %d more ready segments (%s … %s); their archive_command calls return at once",
                 len(done), done[0], done[-1])
    return done
