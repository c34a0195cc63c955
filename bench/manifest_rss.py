"""Peak memory of rewriting a chain restore's backup_manifest (pgdr.incremental.rewrite_backup_manifest) for
a cluster of many files, against parsing the same manifest whole with json.loads (what pgdr did before).

    .venv/bin/python bench/manifest_rss.py                  # 1,000,000 files
    .venv/bin/python bench/manifest_rss.py --files 300000

Each side runs in a process of its own; printed: the manifest's size, the process's peak RSS with the set
of paths that a chain restore holds anyway (the newest member's), and the same without the rewrite.
Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))


def build(target: Path, files: int) -> None:
    parts = ['{ "PostgreSQL-Backup-Manifest-Version": 2,\n"System-Identifier": 7715444862237826023,\n"Files": [\n']
    lines = [json.dumps({"Path": "backup_label", "Size": 10, "Last-Modified": "2026-12-04 10:00:00 GMT",
                         "Checksum-Algorithm": "CRC32C", "Checksum": "aaaaaaaa"})]
    for i in range(files):
        lines.append(json.dumps({"Path": f"base/{16384 + i // 50000}/INCREMENTAL.{100000 + i}", "Size": 8204,
                                 "Last-Modified": "2026-12-04 10:00:01 GMT", "Checksum-Algorithm": "CRC32C",
                                 "Checksum": "bbbbbbbb"}))
    parts.append(",\n".join(lines) + '\n],\n"WAL-Ranges": [\n')
    parts.append('{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000120" }\n],\n')
    body = "".join(parts)
    (target / "backup_manifest").write_text(body + '"Manifest-Checksum": "%s"}\n'
                                            % hashlib.sha256(body.encode()).hexdigest())
    (target / "backup_label").write_text("START WAL LOCATION: 0/2000028\n")


def hwm() -> float:
    """This process's peak RSS in MB (VmHWM: ru_maxrss would carry the parent's across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc/self/status")


def rebuild(target: Path, files: int) -> None:
    """The files a chain's restore would have rebuilt (sparse, 3 blocks each): the rewrite reads their sizes."""
    for i in range(files):
        d = target / "base" / str(16384 + i // 50000)
        if i % 50000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        with open(d / str(100000 + i), "wb") as f:
            f.truncate(3 * 8192)


def child(target: Path, files: int, mode: str) -> None:
    from pgdr.incremental import rewrite_backup_manifest

    rebuilt = {f"base/{16384 + i // 50000}/{100000 + i}" for i in range(files)}
    base = hwm()
    t = time.monotonic()
    if mode == "rewrite":
        rewrite_backup_manifest(target, rebuilt)
    elif mode == "json.loads":
        json.loads((target / "backup_manifest").read_bytes())
    peak = hwm()
    print(json.dumps({"mode": mode, "peak_rss_mb": round(peak), "before_mb": round(base),
                      "seconds": round(time.monotonic() - t, 2)}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), args.files, args.child[1])
        return 0
    with tempfile.TemporaryDirectory(prefix="pgdr-manifest-bench-", dir="/var/tmp") as d:
        build(Path(d), args.files)
        rebuild(Path(d), args.files)
        size = (Path(d) / "backup_manifest").stat().st_size
        print(f"backup_manifest of {args.files} files: {size / 1e6:.0f} MB")
        for mode in ("none", "rewrite", "json.loads"):
            if mode != "none":
                build(Path(d), args.files)
            out = subprocess.run([sys.executable, __file__, "--files", str(args.files), "--child", d, mode],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out)
            print(f"  {mode:10s}: peak RSS {r['peak_rss_mb']} MB ({r['before_mb']} MB with the paths a chain's "
                  f"restore holds alone), {r['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
