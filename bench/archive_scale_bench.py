"""WAL lookups in a large file repository: each wal-push (is the name archived already?) and each wal-fetch
(which object holds it?) lists ``wal/<timeline>/<NAME>.``, and every segment of a timeline lives in one
directory. This times one lookup (``WalArchive.find``) as that directory grows.

    .venv/bin/python bench/archive_scale_bench.py                   # 1k, 10k, 50k, 200k segments
    .venv/bin/python bench/archive_scale_bench.py --sizes 1000,50000

The objects are empty files with real names (the listing never opens them). Numbers are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from pgdr.storage.file import FileStorage  # noqa: E402
from pgdr.wal import WalArchive  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,50000,200000")
    ap.add_argument("--workdir", default="/var/tmp/pgdr-archive-scale")
    ap.add_argument("--lookups", type=int, default=20)
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    timeline = work / "bench" / "wal" / "00000001"
    timeline.mkdir(parents=True)
    archive = WalArchive(FileStorage(work), "bench")
    sha = "5e" * 32
    have = 0
    print(f"{'segments in the timeline':>26} {'lookup ms (median)':>20} {'max':>8}")
    for size in sorted(int(s) for s in args.sizes.split(",")):
        for i in range(have, size):
            (timeline / f"00000001{i >> 8:08X}{i & 0xFF:08X}.{sha}.20261204T000000Z.zst").touch()
        have = size
        times = []
        for k in range(args.lookups):
            i = (k * 7919) % size
            name = f"00000001{i >> 8:08X}{i & 0xFF:08X}"
            t0 = time.perf_counter()
            found = archive.find(name)
            times.append(time.perf_counter() - t0)
            assert len(found) == 1, (name, found)
        print(f"{size:>26} {statistics.median(times) * 1000:>20.1f} {max(times) * 1000:>8.1f}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
