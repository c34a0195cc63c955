"""Thin Airflow adapters around the pgdr core: hooks, operators, notifiers.

Everything here translates Airflow things (connections, context, callbacks)
into core calls; no backup or restore logic lives here.
"""
