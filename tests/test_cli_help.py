"""`pgdr --help` and every subcommand's help: what a new user types first."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from pgdr.cli import _parser


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _help(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgdr", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_top_level_help_lists_every_command(flag):
    proc = _help(flag)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith("usage: pgdr")
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("    ") and line.split()}
    public = {name for name, p in _commands().items() if p.description}
    assert public <= listed, f"not listed: {public - listed}"
    assert "wal-prefetch" not in proc.stdout  # internal: started by wal-fetch, never typed
    assert "SUPPRESS" not in proc.stdout
    # the restore_command / archive_command placeholders are shown literally
    assert "%f %p" in proc.stdout and "wal-push … %p" in proc.stdout


def test_every_subcommand_has_working_help():
    failures = {}
    for name in _commands():
        proc = _help(name, "--help")
        if proc.returncode != 0 or not proc.stdout.startswith(f"usage: pgdr {name}"):
            failures[name] = (proc.returncode, proc.stderr[-300:])
    assert failures == {}


def test_help_says_where_the_config_comes_from():
    proc = _help("check", "--help")
    assert "$PGDR_CONFIG" in proc.stdout and "/etc/pgdr/pgdr.yaml" in proc.stdout


def test_config_lookup_order(monkeypatch, tmp_path):
    """--config, then $PGDR_CONFIG, then /etc/pgdr/pgdr.yaml, then the checkout's include/pgdr.yaml."""
    from pgdr import config, fast

    system, checkout, env = tmp_path / "etc.yaml", tmp_path / "checkout.yaml", tmp_path / "env.yaml"
    monkeypatch.setattr(fast, "SYSTEM_CONFIG", str(system))
    monkeypatch.setattr(fast, "CHECKOUT_CONFIG", str(checkout))
    monkeypatch.delenv("PGDR_CONFIG", raising=False)
    assert config.config_path() == system  # nothing exists: the error names the system path
    checkout.write_text("")
    assert config.config_path() == checkout
    system.write_text("")
    assert config.config_path() == system
    monkeypatch.setenv("PGDR_CONFIG", str(env))
    assert config.config_path() == env  # named explicitly: used even though it is missing
    assert config.config_path(tmp_path / "cli.yaml") == tmp_path / "cli.yaml"


def test_missing_config_names_the_lookup_order(tmp_path):
    proc = _help("--config", str(tmp_path / "none.yaml"), "list", "--cluster", "app", "--json")
    assert proc.returncode == 2
    assert "/etc/pgdr/pgdr.yaml" in proc.stdout and "PGDR_CONFIG" in proc.stdout
