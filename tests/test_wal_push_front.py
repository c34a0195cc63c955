"""archive_command's compiled front, pgdr-fast (plugins/pgdr/fast.c), the binary make venv builds.

It answers a wal-push call itself only when the running pusher acknowledged this very file for this cluster
and configuration file, exactly as pgdr.walpush.answer_push checks it; every other call goes, with the same
arguments, to the pgdr installed beside it. Here a copy of the real binary sits beside a stand-in ``pgdr``
that records how it was called (exit 42), so each test sees which of the two answered. The spool, the lock
and the acknowledgements are written by pgdr's own code (pgdr.fast, pgdr.walpush)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import PGDR_FAST
from pgdr.fast import announce, identity, lock_exclusively, postmaster_is_init, unlock
from pgdr.walpush import LOCK, SPOOL_DIR, Ack, answer_push, file_stamp

NAME = "000000010000000000000003"
STUB = """#!/bin/sh
for a in "$@"; do printf '%s\\n' "$a"; done > "$PGDR_STUB_OUT"
exit 42
"""


class Site:
    """A data directory with one segment ready to archive, its spool, a configuration and the front."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.pg_wal = self.data / "pg_wal"
        (self.pg_wal / "archive_status").mkdir(parents=True)
        self.segment = self.pg_wal / NAME
        self.segment.write_bytes(os.urandom(4096))
        (self.pg_wal / "archive_status" / f"{NAME}.ready").touch()
        (self.data / "postmaster.pid").write_text("4242\n/data\n")
        self.spool = self.pg_wal / SPOOL_DIR
        self.spool.mkdir(mode=0o700)
        self.config = root / "pgdr.yaml"
        self.config.write_text("clusters: {app: {repository: 'file:///nowhere', wal: {mode: push}}}\n")
        self.bin = root / "bin"
        self.bin.mkdir()
        self.front = self.bin / "pgdr-fast"
        shutil.copy(PGDR_FAST, self.front)
        (self.bin / "pgdr").write_text(STUB)
        (self.bin / "pgdr").chmod(0o755)
        self.out = root / "stub-argv"
        self.lock_fd: int | None = None

    @property
    def who(self) -> str:
        return identity("app", str(self.config))

    @property
    def ok(self) -> Path:
        return self.spool / f"{NAME}.ok"

    def args(self, *extra: str) -> list[str]:
        return ["--config", str(self.config), *extra, "wal-push", "--cluster", "app", f"pg_wal/{NAME}"]

    def acknowledge(self, who: str | None = None, stamp: str | None = None) -> None:
        Ack(who or self.who, stamp or file_stamp(os.stat(self.segment)), "ab" * 32,
            f"app/wal/00000001/{NAME}.key").write(str(self.ok))

    def hold_lock(self, who: str | None = None) -> None:
        """A pusher running for ``who`` (this configuration's by default), as pgdr.walpush.run_pusher holds it."""
        self.lock_fd = lock_exclusively(str(self.spool / LOCK), 1)
        announce(self.lock_fd, who or self.who)

    def release_lock(self) -> None:
        if self.lock_fd is not None:
            unlock(self.lock_fd)
            self.lock_fd = None

    def run(self, args: list[str], env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
        self.out.unlink(missing_ok=True)
        environment = {"PATH": "/usr/bin:/bin", "PGDR_STUB_OUT": str(self.out), **(env or {})}
        return subprocess.run([str(self.front), *args], cwd=self.data, env=environment, capture_output=True,
                              text=True, timeout=timeout)

    def handed_over(self) -> list[str] | None:
        """The arguments the stand-in pgdr was called with, None when the front answered itself."""
        return self.out.read_text().splitlines() if self.out.exists() else None


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    yield s
    s.release_lock()


def test_the_front_answers_the_pushers_acknowledgement_as_the_python_call_does(site):
    """The acknowledgement the pusher writes for this file: pgdr's own call takes it (0); written again,
    the front takes it the same way (0) without running pgdr, says so unless -q, and consumes it."""
    site.hold_lock()
    site.acknowledge()
    assert answer_push(["--config", str(site.config), "-q", "wal-push", "--cluster", "app", str(site.segment)]) == 0
    assert not site.ok.exists()

    site.acknowledge()
    proc = site.run(site.args())
    assert proc.returncode == 0, proc.stderr
    assert site.handed_over() is None
    assert proc.stderr == f"pgdr: {NAME} archived by the push queue (app/wal/00000001/{NAME}.key)\n"
    assert not site.ok.exists()

    site.acknowledge()
    proc = site.run(site.args("-q"))
    assert (proc.returncode, proc.stderr, site.handed_over(), site.ok.exists()) == (0, "", None, False)


def test_an_acknowledgement_counts_after_its_pusher_went_away(site):
    """Written once the upload was durable: true whether or not the pusher still runs (as for pgdr's call)."""
    site.acknowledge()
    proc = site.run(site.args("-q"))
    assert (proc.returncode, site.handed_over(), site.ok.exists()) == (0, None, False), proc.stderr


def test_the_configuration_may_come_from_pgdr_config(site):
    site.hold_lock()
    site.acknowledge()
    args = ["-q", "wal-push", "--cluster=app", "--parallel=4", "--timeout", "5", f"pg_wal/{NAME}"]
    proc = site.run(args, env={"PGDR_CONFIG": str(site.config)})
    assert (proc.returncode, site.handed_over(), site.ok.exists()) == (0, None, False), proc.stderr


def test_the_front_waits_while_its_pusher_works(site):
    """No acknowledgement yet, the pusher of this configuration running: the call waits for it, as the
    Python call does, and answers once it is written."""
    site.hold_lock()
    timer = threading.Timer(0.4, site.acknowledge)
    timer.start()
    t0 = time.monotonic()
    proc = site.run(site.args("-q"))
    waited = time.monotonic() - t0
    timer.join()
    assert (proc.returncode, site.handed_over(), site.ok.exists()) == (0, None, False), proc.stderr
    assert waited >= 0.4


def test_no_acknowledgement_within_the_timeout_is_a_failure_postgres_retries(site):
    site.hold_lock()
    proc = site.run(site.args("--timeout", "0.3"))
    assert proc.returncode == 1 and site.handed_over() is None
    assert f"{NAME} not archived by the push queue within 0.3 s" in proc.stderr


def _not_ready(s: Site):
    (s.pg_wal / "archive_status" / f"{NAME}.ready").rename(s.pg_wal / "archive_status" / f"{NAME}.done")


def _changed_since(s: Site):
    time.sleep(0.01)
    s.segment.write_bytes(os.urandom(4096))  # another file of that name: the acknowledgement is for the earlier


def _elsewhere(s: Site):
    (s.data / "copy").mkdir()
    shutil.copy(s.segment, s.data / "copy" / NAME)


def _stamped_after_2262(s: Site):
    """A modification time past what 64-bit nanoseconds hold; the acknowledgement carries the wrapped value a
    careless reading would compute, which Python's (exact) stamp never equals."""
    ns = 2**63 + 5
    os.utime(s.segment, ns=(ns, ns))
    st = os.stat(s.segment)
    assert st.st_mtime_ns == ns
    s.acknowledge(stamp=f"{st.st_dev} {st.st_ino} {st.st_size} {ns - 2**64}")


HANDED_OVER = {
    # what the call is: (how the site is changed, the command line); the pusher runs and the acknowledgement
    # is there (for this file and configuration) unless the case says otherwise
    "not acknowledged, no pusher runs": (lambda s: (s.ok.unlink(), s.release_lock()), None),
    "not acknowledged, another configuration's pusher runs": (
        lambda s: (s.ok.unlink(), s.release_lock(), s.hold_lock("app|/other.yaml|1.2.3.4")), None),
    "acknowledged for another cluster": (lambda s: s.acknowledge(who=identity("other", str(s.config))), None),
    "acknowledged for an earlier file": (_changed_since, None),
    "a failure to report": (lambda s: (s.ok.unlink(), (s.spool / f"{NAME}.error").write_text("denied")), None),
    "not marked ready": (_not_ready, None),
    "no spool": (lambda s: (s.release_lock(), shutil.rmtree(s.spool)), None),
    "a postmaster as PID 1": (lambda s: (s.data / "postmaster.pid").write_text("1\n/data\n"), None),
    "a postmaster.pid not in plain digits": (lambda s: (s.data / "postmaster.pid").write_bytes(b"1\rfoo\n"), None),
    "an acknowledgement that is not ASCII": (
        lambda s: s.ok.write_bytes(s.ok.read_bytes().rstrip(b"\n") + b"\xff\xfe\n"), None),
    "a file stamped after 2262": (_stamped_after_2262, None),
    "a file outside pg_wal": (_elsewhere, ["--config", "CONFIG", "wal-push", "--cluster", "app", f"copy/{NAME}"]),
    "a path to normalise": (None, ["--config", "CONFIG", "wal-push", "--cluster", "app", f"pg_wal/../pg_wal/{NAME}"]),
    "not a WAL file name": (lambda s: (s.pg_wal / "archive_status" / "notes.ready").touch(),
                            ["--config", "CONFIG", "wal-push", "--cluster", "app", "pg_wal/notes"]),
    "--json": (None, ["--config", "CONFIG", "--json", "wal-push", "--cluster", "app", f"pg_wal/{NAME}"]),
    "--parallel 0": (None, ["--config", "CONFIG", "wal-push", "--cluster", "app", "--parallel", "0", f"pg_wal/{NAME}"]),
    "--parallel 9": (None, ["--config", "CONFIG", "wal-push", "--cluster", "app", "--parallel", "9", f"pg_wal/{NAME}"]),
    "--timeout 0": (None, ["--config", "CONFIG", "wal-push", "--cluster", "app", "--timeout", "0", f"pg_wal/{NAME}"]),
    "--timeout 0x10": (None, ["--config", "CONFIG", "wal-push", "--cluster", "app", "--timeout=0x10",
                              f"pg_wal/{NAME}"]),
    "no cluster": (None, ["--config", "CONFIG", "wal-push", f"pg_wal/{NAME}"]),
    "two files": (None, ["--config", "CONFIG", "wal-push", "--cluster", "app", f"pg_wal/{NAME}", f"pg_wal/{NAME}"]),
    "no configuration named": (None, ["wal-push", "--cluster", "app", f"pg_wal/{NAME}"]),
    "a missing value": (None, ["--config", "CONFIG", "wal-push", f"pg_wal/{NAME}", "--cluster"]),
    "another command": (None, ["--config", "CONFIG", "list", "--cluster", "app"]),
    "nothing": (None, []),
}


@pytest.mark.parametrize("case", HANDED_OVER, ids=list(HANDED_OVER))
def test_every_other_call_goes_to_pgdr_with_its_arguments_unchanged(site, case):
    change, args = HANDED_OVER[case]
    site.hold_lock()
    site.acknowledge()
    if change:
        change(site)
    args = [str(site.config) if a == "CONFIG" else a for a in (args if args is not None else site.args())]
    ack_before = site.ok.read_bytes() if site.ok.exists() else None
    proc = site.run(args)
    assert proc.returncode == 42, (proc.returncode, proc.stderr)
    assert site.handed_over() == args
    assert (site.ok.read_bytes() if site.ok.exists() else None) == ack_before, "an acknowledgement was consumed"


def test_a_front_with_no_pgdr_beside_it_fails_the_call_and_says_why(site):
    """Exit 1: PostgreSQL keeps the segment and retries; nothing is marked archived."""
    (site.bin / "pgdr").unlink()
    proc = site.run(site.args())
    assert proc.returncode == 1
    assert f"cannot run {site.bin / 'pgdr'}" in proc.stderr and "not archived" in proc.stderr


def test_a_damaged_postmaster_pid_is_read_not_raised_on(tmp_path):
    """pgdr.fast.postmaster_is_init runs in every archive_command and restore_command call: bytes that are
    not text answer "not PID 1" (a crash there would end recovery or fail archiving)."""
    pid = tmp_path / "postmaster.pid"
    for content, init in ((b"\xff\xfe\n", False), (b"4242\n\xff\n", False), (b"1\n/data\n", True),
                          (b" 1 \n", True), (b"11\n", False)):
        pid.write_bytes(content)
        assert postmaster_is_init(str(tmp_path)) is init, content
