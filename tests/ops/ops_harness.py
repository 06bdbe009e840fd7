"""Shared helpers for the operations tests: repository paths, promtool/prometheus, a real Prometheus process.

Prometheus and promtool come from Debian's ``prometheus`` package (``make prometheus`` installs it). When they
are missing the tests fail, naming the package: they are never skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
DASHBOARD_FILES = sorted((DEPLOY / "grafana" / "dashboards").rglob("*.json"))
DATASOURCE_UID = "prometheus"

MISSING_PROMETHEUS = (
    "{tool} not found on PATH: install Debian's 'prometheus' package (it ships prometheus and promtool): "
    "`make prometheus`, or `apt-get install -y --no-install-recommends prometheus`"
)

# What Grafana substitutes in queries, with values that make sense for a Prometheus scraping every second
# for about a minute: $__rate_interval covers several scrapes, $__range the whole test.
GRAFANA_VARIABLES = {
    "$__rate_interval": "30s",
    "$__interval": "5s",
    "$__range": "10m",
    "$model": ".*",
}


def tool(name: str) -> str:
    """The path of `name` (``prometheus`` or ``promtool``); fails the test when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(MISSING_PROMETHEUS.format(tool=name), pytrace=False)
    return path


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], input=stdin, capture_output=True, text=True, timeout=60)


def free_port() -> int:
    """A free TCP port on loopback (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_yaml_docs(path: Path) -> list[Any]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def dashboards() -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(REPO)): json.loads(p.read_text()) for p in DASHBOARD_FILES}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel with queries, including panels nested in collapsed rows."""
    for p in dashboard.get("panels", []):
        if p.get("type") == "row":
            yield from (q for q in p.get("panels", []))
            continue
        yield p


def grafana_expr(expr: str) -> str:
    """A dashboard query as Grafana would send it, with its variables substituted."""
    for var, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    left = re.findall(r"\$\{?\w+", expr)
    assert not left, f"query uses Grafana variables the tests do not know: {left} in {expr!r}"
    return expr


def rules() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in RULE_FILES:
        for doc in load_yaml_docs(path):
            for group in doc["groups"]:
                out.extend(group["rules"])
    return out


class Prometheus:
    """A real Prometheus process on a free loopback port with temporary storage."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "prometheus.log"
        check = run_promtool("check", "config", str(self.config_path))
        assert check.returncode == 0, f"generated Prometheus config is invalid:\n{check.stdout}{check.stderr}"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready after {timeout}s:\n{self.log()}")

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET /api/v1/<path>; returns the parsed body, errors included (status "error", errorType)."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as err:  # 400/422 carry the PromQL error as JSON
            return json.loads(err.read())

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
