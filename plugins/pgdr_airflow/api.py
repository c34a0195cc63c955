"""Disaster recovery in Airflow's own API server: a FastAPI app mounted at ``/pgdr`` by ``pgdr_plugin``.

Every route but ``GET /pgdr/health/backup`` needs an Airflow login (the JWT bearer token, or the UI's
``_token`` cookie) and is authorized by Airflow's auth manager through ``airflow.api_fastapi.core_api.security``:

  - reading a cluster: read access to its DAGs (``pgdr_<cluster>_backup``, ``_verify``, ``_retention``,
    ``_restore``);
  - starting a backup, verify, drill or restore dry run, keeping a backup, refreshing the catalog: permission to
    create runs of the matching DAG;
  - a real restore, deleting a backup, removing a pin: that, and the Admin role.

Data comes from the catalog cache (``<cluster>/catalog.json``, pgdr.catalog), never from listing the repository
per request. Errors are JSON: ``{"error": <the CLI's error kind>, "message": ..., "field": ...}`` with 400 (bad
body, the field named), 403, 404 (unknown cluster or backup), 409 (a held lock, or retention keeps it), 423
(S3 Object Lock).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag, resolve_user_from_token
from pgdr.errors import BackupNotFound, ConfigError, PgdrError
from pgdr.labels import LABEL
from pgdr_airflow.params import ISO_TIME, LSN, TARGET_ACTIONS, TARGETS, backup_choice

log = logging.getLogger(__name__)
READ_DAGS = ("backup", "verify", "retention", "restore")
HTTP = {"usage": 400, "config": 400, "backup_not_found": 404, "cluster_not_found": 404, "dag_not_found": 404,
        "locked": 409, "delete_refused": 409, "already_pinned": 409, "not_pinned": 409, "dag_run_exists": 409,
        "object_lock": 423, "forbidden": 403, "repository": 502, "object_not_found": 502}

app = FastAPI(title="pgdr disaster recovery", docs_url=None, redoc_url=None, openapi_url=None)


# ---------------------------------------------------------------------------------------------------- errors
class ApiError(PgdrError):
    def __init__(self, kind: str, message: str, status: int, **extra):
        super().__init__(message)
        self.kind, self.status, self.extra = kind, status, extra

    def to_dict(self) -> dict:
        return {**super().to_dict(), **self.extra}


@app.exception_handler(PgdrError)
async def _pgdr_error(request: Request, e: PgdrError):
    status = getattr(e, "status", None) or HTTP.get(e.kind, 500 if e.exit_code == 1 else 400)
    if isinstance(e, ConfigError) and "no cluster named" in str(e):
        status = 404
    return JSONResponse(e.to_dict(), status_code=status)


@app.exception_handler(RequestValidationError)
async def _bad_request(request: Request, e: RequestValidationError):
    errors = e.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    field = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        field, message = "body", "the body is not valid JSON"
    return JSONResponse({"error": "usage", "message": f"{field}: {message}" if field else message, "field": field,
                         "errors": [{"field": ".".join(str(p) for p in x.get("loc", ()) if p != "body"),
                                     "message": x.get("msg")} for x in errors]}, status_code=400)


from fastapi import HTTPException as _HTTPException  # noqa: E402


@app.exception_handler(_HTTPException)
async def _http_error(request: Request, e: _HTTPException):
    kind = {401: "unauthorized", 403: "forbidden", 404: "not_found"}.get(e.status_code, "error")
    return JSONResponse({"error": kind, "message": str(e.detail)}, status_code=e.status_code,
                        headers=getattr(e, "headers", None))


# ---------------------------------------------------------------------------------------------------- config
_config_cache: dict = {}


def config():
    """The pgdr config, re-read when the file changes (no restart of the API server needed)."""
    from pgdr.config import config_path, load_config

    path = config_path()
    try:
        stamp = (str(path), path.stat().st_mtime_ns)
    except OSError:
        stamp = (str(path), None)
    if _config_cache.get("stamp") != stamp:
        _config_cache.update(stamp=stamp, config=load_config(path))
    return _config_cache["config"]


def cluster_config(name: str):
    clusters = config().clusters
    if name not in clusters:
        raise ApiError("cluster_not_found", f"no cluster named {name!r} (configured: "
                       f"{', '.join(sorted(clusters)) or 'none'})", 404)
    return clusters[name]


def repository(cluster):
    from pgdr.repository import Repository
    from pgdr_airflow.hooks import PgdrHook

    hook = PgdrHook(cluster.name)
    hook.__dict__["cluster"] = cluster  # the cached_property: the config already read
    return Repository(hook.storage(), cluster.name)


# ---------------------------------------------------------------------------------------------------- access
def _authorized(user, method: str, dag_id: str, entity=None) -> bool:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager().is_authorized_dag(method=method, access_entity=entity,
                                                details=DagDetails(id=dag_id), user=user)


def can_read(user, cluster: str) -> bool:
    return all(_authorized(user, "GET", f"pgdr_{cluster}_{d}") for d in READ_DAGS)


def is_admin(user) -> bool:
    """The auth manager's Admin: SimpleAuthManager's ADMIN role, FAB's "Admin" role; any other auth manager
    decides through its custom-view check on the "pgdr" resource with DELETE."""
    from airflow.api_fastapi.app import get_auth_manager

    am = get_auth_manager()
    if hasattr(am, "_is_admin"):
        return bool(am._is_admin(user))
    roles = getattr(user, "roles", None)
    if roles is not None:
        return any(getattr(r, "name", r) == "Admin" for r in roles)
    return bool(am.is_authorized_custom_view(method="DELETE", resource_name="pgdr", user=user))


def read_cluster(request: Request, user: GetUserDep, cluster: str):
    """Read access to every DAG of the cluster (Airflow's requires_access_dag), then the cluster's config."""
    for d in READ_DAGS:
        requires_access_dag("GET", param_dag_id=f"pgdr_{cluster}_{d}")(request, user)
    return cluster_config(cluster)


def run_creator(kind: str):
    """Permission to create runs of ``pgdr_<cluster>_<kind>`` (what Airflow's trigger endpoint asks)."""
    def dep(request: Request, user: GetUserDep, cluster: str):
        read_cluster(request, user, cluster)
        requires_access_dag("POST", DagAccessEntity.RUN, param_dag_id=f"pgdr_{cluster}_{kind}")(request, user)
        return cluster_config(cluster)
    return dep


def admin(kind: str):
    def dep(request: Request, user: GetUserDep, cluster: str):
        c = run_creator(kind)(request, user, cluster)
        if not is_admin(user):
            raise ApiError("forbidden", "this action needs the Admin role", 403)
        return c
    return dep


# ---------------------------------------------------------------------------------------------------- data
def snapshot(cluster) -> dict:
    """The catalog cache; refreshed first when there is none, and empty (nothing written) while the repository
    does not hold the cluster yet."""
    from pgdr.audit import repository_exists
    from pgdr.catalog import CatalogSnapshot, cached_catalog, refresh_catalog
    from pgdr.results import iso

    repo = repository(cluster)
    cached = cached_catalog(repo)
    if cached is not None:
        return cached.to_dict()
    if not repository_exists(repo.storage, cluster.name):
        return CatalogSnapshot(cluster=cluster.name, repository=repo.storage.describe(),
                               catalog_refreshed_at=iso(datetime.now(timezone.utc))).to_dict()
    return refresh_catalog(repo).to_dict()


def status_of(cluster, now=None) -> tuple[dict | None, object]:
    """(snapshot or None, ClusterStatus); an unreadable repository is a status, not an error."""
    from pgdr.status import cluster_status

    now = now or datetime.now(timezone.utc)
    try:
        snap = snapshot(cluster)
    except PgdrError as e:
        return None, cluster_status(None, cluster, now, error=str(e))
    return snap, cluster_status(snap, cluster, now)


def status_dict(st) -> dict:
    return {**st.to_dict(), "status": st.status}


def audit(user, cluster, action: str, parameters: dict, outcome: str, started: float, error=None, result=None):
    from pgdr.audit import record_operation

    from pgdr.audit import repository_exists

    try:
        storage = repository(cluster).storage
        if not repository_exists(storage, cluster.name):
            log.info("not recording %s on %s: its repository holds nothing yet", action, cluster.name)
            return
        record_operation(storage, cluster.name, actor=user.get_name(), actor_type="airflow",
                         source="api", action=action, parameters=parameters, outcome=outcome,
                         duration_seconds=time.monotonic() - started, error=getattr(error, "kind", None),
                         message=str(error) if error else None, result=result)
    except PgdrError as e:
        log.warning("could not write the audit record for %s on %s: %s", action, cluster.name, e)


def refresh_quietly(cluster) -> None:
    from pgdr.catalog import refresh_catalog

    try:
        refresh_catalog(repository(cluster))
    except PgdrError as e:
        log.warning("could not refresh the catalog of %s: %s", cluster.name, e)


# ---------------------------------------------------------------------------------------------------- health
async def _optional_user(request: Request):
    auth = request.headers.get("authorization", "")
    token = auth[7:] if auth.lower().startswith("bearer ") else request.cookies.get("_token")
    if not token:
        return None
    try:
        return await resolve_user_from_token(token)
    except Exception:
        return None


@app.get("/health/backup")
async def health_backup(request: Request):
    """200 when every cluster is healthy, else 503. Anonymous callers get the status and each cluster's codes;
    a logged-in caller also gets the reasons and figures of the clusters it may read."""
    from starlette.concurrency import run_in_threadpool

    user = await _optional_user(request)
    clusters = {}
    now = datetime.now(timezone.utc)
    try:
        configured = config().clusters
    except PgdrError as e:  # a monitor must see "unhealthy", not a client error
        body = {"status": "unhealthy", "error": e.kind}
        return JSONResponse({**body, "message": str(e)} if user is not None else body, status_code=503)
    for name, c in sorted(configured.items()):
        _, st = await run_in_threadpool(status_of, c, now)
        entry = {"status": st.status, "codes": st.codes}
        if user is not None and await run_in_threadpool(can_read, user, name):
            entry = status_dict(st)
        clusters[name] = entry
    healthy = all(c["status"] == "healthy" for c in clusters.values())
    return JSONResponse({"status": "healthy" if healthy else "unhealthy", "clusters": clusters},
                        status_code=200 if healthy else 503)


@app.get("/metrics")
def metrics(request: Request, user: GetUserDep):
    """Prometheus exposition of every cluster the caller may read."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    from pgdr.status import METRICS, metric_values

    registry = CollectorRegistry()
    gauges = {name: Gauge(name, help_, ["cluster"], registry=registry) for name, help_, _ in METRICS}
    now = datetime.now(timezone.utc)
    for name, c in sorted(config().clusters.items()):
        if not can_read(user, name):
            continue
        _, st = status_of(c, now)
        for metric, value in metric_values(st, now).items():
            gauges[metric].labels(cluster=name).set(value)
    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------------------------------------- read API
V1 = "/api/v1"


@app.get(V1 + "/clusters")
def list_clusters(request: Request, user: GetUserDep):
    """Every cluster the caller may read, with its status."""
    out = []
    for name, c in sorted(config().clusters.items()):
        if can_read(user, name):
            out.append(status_dict(status_of(c)[1]))
    return {"clusters": out}


@app.get(V1 + "/clusters/{cluster}")
def get_cluster(cluster=Depends(read_cluster)):
    return status_dict(status_of(cluster)[1])


@app.get(V1 + "/clusters/{cluster}/backups")
def list_backups(cluster=Depends(read_cluster)):
    """``pgdr list --json``'s shape (cluster, repository, backups), plus catalog_refreshed_at."""
    snap = snapshot(cluster)
    return {"cluster": snap["cluster"], "repository": snap["repository"], "backups": snap["backups"],
            "catalog_refreshed_at": snap["catalog_refreshed_at"]}


@app.get(V1 + "/clusters/{cluster}/backups/{label}")
def get_backup(label: str, cluster=Depends(read_cluster)):
    """``pgdr info --json``'s shape: the manifest and its verification; plus the pin."""
    from pgdr.labels import check_label
    from pgdr.results import iso
    from pgdr.retention import pinned_until
    from pgdr.verify import last_verification

    if label != "latest":
        try:
            check_label(label)
        except PgdrError as e:
            raise ApiError("usage", str(e), 400, field="label") from None
    repo = repository(cluster)
    m = repo.resolve(label)
    pin = pinned_until(repo, m.label)
    return {**m.to_dict(), "verification": last_verification(repo, m.label),
            "pinned_until": None if pin is None else ("forever" if pin.year == 9999 else iso(pin))}


@app.get(V1 + "/clusters/{cluster}/drills")
def list_drills(cluster=Depends(read_cluster)):
    """The drill history (``<cluster>/reports/drill/``), newest first; empty when no drill ran yet."""
    snap = snapshot(cluster)
    return {"cluster": cluster.name, "drills": list(reversed(snap.get("drills") or [])),
            "catalog_refreshed_at": snap["catalog_refreshed_at"]}


@app.get(V1 + "/clusters/{cluster}/audit")
def cluster_audit(cluster=Depends(read_cluster), actor: str | None = Query(None, max_length=200),
                  action: str | None = Query(None, pattern=r"^[a-z_]{1,40}$"), limit: int = Query(200, ge=1, le=5000)):
    from pgdr.audit import read_operations

    return {"records": read_operations(repository(cluster).storage, cluster.name, actor=actor, action=action,
                                       limit=limit)}


@app.get(V1 + "/audit")
def all_audit(request: Request, user: GetUserDep, cluster: str | None = Query(None, pattern=r"^[a-z][a-z0-9_]*$"),
              actor: str | None = Query(None, max_length=200), action: str | None = Query(None, pattern=r"^[a-z_]{1,40}$"),
              limit: int = Query(200, ge=1, le=5000)):
    """The audit log of every cluster the caller may read (or one), newest first."""
    from pgdr.audit import read_operations

    names = [cluster] if cluster else sorted(config().clusters)
    records = []
    for name in names:
        c = cluster_config(name)
        if not can_read(user, name):
            if cluster:
                raise ApiError("forbidden", f"no read access to cluster {name!r}", 403)
            continue
        try:
            records += read_operations(repository(c).storage, name, actor=actor, action=action, limit=limit)
        except PgdrError as e:
            log.warning("audit log of %s unreadable: %s", name, e)
    records.sort(key=lambda r: r.get("recorded_at") or "", reverse=True)
    return {"records": records[:limit]}


# ---------------------------------------------------------------------------------------------------- actions
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackupBody(_Body):
    note: str | None = Field(None, max_length=1000)


class VerifyBody(_Body):
    scope: str = Field("new", pattern=backup_choice("FS", ("new", "all", "latest")))
    note: str | None = Field(None, max_length=1000)


class DrillBody(_Body):
    note: str | None = Field(None, max_length=1000)


class RestoreBody(_Body):
    backup: str = Field("latest", pattern=backup_choice("FS"))
    target: Literal[TARGETS] = "end_of_backup"  # the restore form's choices
    target_time: str | None = Field(None, pattern=ISO_TIME)
    target_lsn: str | None = Field(None, pattern=LSN)
    target_xid: int | None = Field(None, ge=3)
    target_name: str | None = Field(None, min_length=1, max_length=63)
    target_action: Literal[TARGET_ACTIONS] = "promote"
    target_exclusive: bool = False
    pgdata: str | None = Field(None, pattern=r"^/[A-Za-z0-9._/-]+$")
    port: int | None = Field(None, ge=1024, le=65535)
    start: bool | None = None
    dry_run: bool = True
    replace: bool = False
    confirm_cluster: str = Field("", max_length=63)
    note: str | None = Field(None, max_length=1000)


class KeepBody(_Body):
    until: datetime | None = None


def _trigger(user, cluster, kind: str, conf: dict, note: str | None, action: str) -> dict:
    """A run of ``pgdr_<cluster>_<kind>`` through Airflow's own trigger: done, logged and retried like any run."""
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.exceptions import DagNotFound, DagRunAlreadyExists
    from airflow.utils.types import DagRunTriggeredByType

    dag_id = f"pgdr_{cluster.name}_{kind}"
    started = time.monotonic()
    try:
        dr = trigger_dag(dag_id, triggered_by=DagRunTriggeredByType.REST_API, triggering_user_name=user.get_name(),
                         conf=conf, note=note)
    except DagNotFound:
        e = ApiError("dag_not_found", f"DAG {dag_id} is not known to Airflow (is the DAG file deployed and "
                     "parsed?)", 404)
        audit(user, cluster, action, conf, "failed", started, error=e)
        raise e from None
    except DagRunAlreadyExists as ex:
        e = ApiError("dag_run_exists", str(ex), 409)
        audit(user, cluster, action, conf, "refused", started, error=e)
        raise e from None
    except ValueError as ex:
        e = ApiError("usage", str(ex), 400)
        audit(user, cluster, action, conf, "refused", started, error=e)
        raise e from None
    result = {"cluster": cluster.name, "dag_id": dag_id, "run_id": dr.run_id, "state": str(dr.state), "conf": conf}
    audit(user, cluster, action, conf, "started", started, result={"dag_id": dag_id, "run_id": dr.run_id})
    return result


@app.post(V1 + "/clusters/{cluster}/backup", status_code=202)
def start_backup(user: GetUserDep, body: BackupBody | None = None, cluster=Depends(run_creator("backup"))):
    return _trigger(user, cluster, "backup", {}, (body or BackupBody()).note, "backup")


@app.post(V1 + "/clusters/{cluster}/verify", status_code=202)
def start_verify(user: GetUserDep, body: VerifyBody | None = None, cluster=Depends(run_creator("verify"))):
    body = body or VerifyBody()
    return _trigger(user, cluster, "verify", {"scope": body.scope}, body.note, "verify")


@app.post(V1 + "/clusters/{cluster}/drill", status_code=202)
def start_drill(user: GetUserDep, body: DrillBody | None = None, cluster=Depends(run_creator("drill"))):
    return _trigger(user, cluster, "drill", {}, (body or DrillBody()).note, "drill")


@app.post(V1 + "/clusters/{cluster}/restore", status_code=202)
def start_restore(request: Request, user: GetUserDep, body: RestoreBody | None = None,
                  cluster=Depends(run_creator("restore"))):
    """A dry run (the plan, nothing written) unless ``dry_run`` is false, which needs the Admin role."""
    body = body or RestoreBody()
    if not body.dry_run and not is_admin(user):
        audit(user, cluster, "restore", body.model_dump(exclude_none=True), "refused", time.monotonic(),
              error=ApiError("forbidden", "a restore that is not a dry run needs the Admin role", 403))
        raise ApiError("forbidden", "a restore that is not a dry run needs the Admin role", 403)
    needs = {"time": "target_time", "lsn": "target_lsn", "xid": "target_xid", "name": "target_name"}
    if body.target in needs and getattr(body, needs[body.target]) is None:
        raise ApiError("usage", f"{needs[body.target]}: is required with target={body.target}", 400,
                       field=needs[body.target])
    conf = body.model_dump(exclude_unset=True, exclude={"note"})
    conf["dry_run"] = body.dry_run
    return _trigger(user, cluster, "restore", conf, body.note, "restore")


@app.post(V1 + "/clusters/{cluster}/backups/{label}/keep")
def keep_backup(label: str, user: GetUserDep, body: KeepBody | None = None,
                cluster=Depends(run_creator("retention"))):
    """Pin a backup against retention (a legal hold), indefinitely or ``until``."""
    from pgdr.retention import set_keep

    _label(label)
    until = (body or KeepBody()).until
    if until is not None and until.tzinfo is None:
        raise ApiError("usage", "until: needs a time zone (like 2027-01-01T00:00:00Z)", 400, field="until")
    return _repository_action(user, cluster, "keep", {"label": label, "until": until.isoformat() if until else None},
                              lambda repo: set_keep(repo, label, until, datetime.now(timezone.utc)))


@app.delete(V1 + "/clusters/{cluster}/backups/{label}/keep")
def unkeep_backup(label: str, user: GetUserDep, cluster=Depends(admin("retention"))):
    from pgdr.retention import clear_keep

    _label(label)

    def act(repo):
        try:
            return clear_keep(repo, label)
        except BackupNotFound:
            raise
        except PgdrError as e:
            if "is not pinned" in str(e):
                raise ApiError("not_pinned", str(e), 409) from None
            raise
    return _repository_action(user, cluster, "unkeep", {"label": label}, act)


@app.delete(V1 + "/clusters/{cluster}/backups/{label}")
def delete_backup(label: str, user: GetUserDep, cluster=Depends(admin("retention"))):
    """Delete one backup, only where retention would allow it (409 when it keeps it, 423 under Object Lock)."""
    from pgdr.delete import delete_backup as delete

    _label(label)
    return _repository_action(user, cluster, "delete", {"label": label}, lambda repo: delete(repo, label))


@app.post(V1 + "/clusters/{cluster}/refresh")
def refresh(user: GetUserDep, cluster=Depends(run_creator("backup"))):
    """Re-read the repository into the catalog cache now."""
    from pgdr.catalog import refresh_catalog

    snap = refresh_catalog(repository(cluster))
    return {"cluster": cluster.name, "catalog_refreshed_at": snap.catalog_refreshed_at,
            "backups": len(snap.backups)}


def _label(label: str) -> None:
    if not LABEL.fullmatch(label):  # the core's own label rule: full, safety (…S) and incremental (…F_…I) labels
        raise ApiError("usage", f"label: {label!r} is not a backup label (like 20261125-020000F or "
                       "20261125-020000F_20261126-020000I)", 400, field="label")


def _repository_action(user, cluster, action: str, params: dict, fn):
    started = time.monotonic()
    repo = repository(cluster)
    try:
        result = fn(repo)
    except PgdrError as e:
        audit(user, cluster, action, params, "refused" if getattr(e, "status", HTTP.get(e.kind, 500)) < 500
              else "failed", started, error=e)
        raise
    audit(user, cluster, action, params, "ok", started, result=result if isinstance(result, dict) else None)
    refresh_quietly(cluster)
    return result


# ---------------------------------------------------------------------------------------------------- the page
STATIC = Path(__file__).parent / "static"


async def page_user(request: Request):
    """The logged-in user, or a redirect to Airflow's login that comes back here."""
    user = await _optional_user(request)
    if user is None:
        raise _LoginRedirect()
    return user


class _LoginRedirect(Exception):
    pass


@app.exception_handler(_LoginRedirect)
async def _to_login(request: Request, e):
    return RedirectResponse(f"/auth/login/?next={request.url.path}", status_code=307)


@app.get("/ui", response_class=HTMLResponse)
def page(user=Depends(page_user)):
    return HTMLResponse((STATIC / "dr.html").read_text(), headers={"Cache-Control": "no-store"})


@app.get("/ui/plotly.min.js")
def plotly_js(user=Depends(page_user)):
    """Plotly's own build, from the installed plotly package (not vendored into pgdr)."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    return FileResponse(path, media_type="application/javascript",
                        headers={"Cache-Control": "private, max-age=86400"})


@app.get("/ui/{name}.svg")
def icon(name: Literal["icon", "icon-dark"], user=Depends(page_user)):
    """The navigation entry's icon (light and dark)."""
    return FileResponse(STATIC / f"{name}.svg", media_type="image/svg+xml",
                        headers={"Cache-Control": "private, max-age=86400"})


PAGE_FIELDS = ("label", "status", "start_time", "stop_time", "size", "stored_size", "pinned_until")


def _page_backup(b: dict) -> dict:
    """What the page's table and charts show of a backup (the full record: GET …/backups)."""
    v = b.get("verification")
    return {**{k: b.get(k) for k in PAGE_FIELDS},
            "verification": {"ok": v.get("ok"), "verified_at": v.get("verified_at")} if v else None}


@app.get(V1 + "/overview")
def overview(request: Request, user: GetUserDep, audit_limit: int = Query(100, ge=0, le=2000)):
    """Everything the page shows, for every cluster the caller may read, in one response: from the catalog
    cache (one small read per cluster); ``audit_limit=0`` leaves out the audit log, which is read from the
    repository (the page fetches it from /api/v1/audit after its first paint)."""
    from pgdr.audit import read_operations

    now = datetime.now(timezone.utc)
    clusters, records = [], []
    for name, c in sorted(config().clusters.items()):
        if not can_read(user, name):
            continue
        snap, st = status_of(c, now)
        item = {"status": status_dict(st), "backups": [_page_backup(b) for b in (snap or {}).get("backups") or []],
                "drills": (snap or {}).get("drills") or [],
                "lag_history": ((snap or {}).get("wal") or {}).get("lag_history") or [],
                "can_trigger": _authorized(user, "POST", f"pgdr_{name}_verify", DagAccessEntity.RUN)}
        clusters.append(item)
        if audit_limit:
            try:
                records += read_operations(repository(c).storage, name, limit=audit_limit)
            except PgdrError as e:
                log.warning("audit log of %s unreadable: %s", name, e)
    records.sort(key=lambda r: r.get("recorded_at") or "", reverse=True)
    return {"generated_at": now.isoformat(), "user": user.get_name(), "is_admin": is_admin(user),
            "clusters": clusters, "audit": records[:audit_limit]}
