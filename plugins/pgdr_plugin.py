"""The pgdr Airflow plugin: disaster recovery in Airflow's own API server and UI.

- ``/pgdr``: the REST API (``/pgdr/api/v1/...``), ``/pgdr/health/backup``, ``/pgdr/metrics`` and the
  Disaster recovery page (``/pgdr/ui``), all behind Airflow's login and roles but the health endpoint
  (pgdr_airflow.api).
- "Disaster recovery" in the UI's navigation: that page, inside Airflow's frame.
- A listener that, after each pgdr task, records it in the audit log and refreshes the catalog cache
  (pgdr_airflow.listener).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from pgdr_airflow import listener
from pgdr_airflow.api import app


class PgdrPlugin(AirflowPlugin):
    name = "pgdr"
    listeners = [listener]  # after each pgdr task: the audit record and the catalog refresh
    fastapi_apps = [{"name": "pgdr", "url_prefix": "/pgdr", "app": app}]
    external_views = [{"name": "Disaster recovery", "href": "/pgdr/ui", "destination": "nav",
                       "url_route": "disaster-recovery", "icon": "/pgdr/ui/icon.svg",
                       "icon_dark_mode": "/pgdr/ui/icon-dark.svg"}]
