"""Generates the Grafana dashboards in ``deploy/grafana/dashboards/drmguard/`` (dashboards as code).

The JSON files are committed and are what Grafana provisions; this script only keeps their layout, ids and
datasource references consistent. After editing a panel here, run::

    python deploy/grafana/dashboards.py

``tests/ops`` checks that the committed JSON equals this script's output, and evaluates every
``targets[].expr`` against a Prometheus that scrapes a live guard server.

Queries use Grafana's ``$__rate_interval`` for per-second rates, ``$__range`` for "over the selected
period", and the ``$model`` variable (regex, ``.*`` for All) on the inference dashboard.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "dashboards" / "drmguard"
# Pinned in deploy/grafana/provisioning/datasources/prometheus.yaml; dashboards never pick "default".
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
SCHEMA_VERSION = 39


class _Layout:
    """Hands out panel ids and grid positions row by row (Grafana's grid is 24 units wide)."""

    def __init__(self) -> None:
        self.next_id = 1
        self.x = 0
        self.y = 0
        self.row_h = 0

    def place(self, w: int, h: int) -> tuple[int, dict[str, int]]:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        pid = self.next_id
        self.next_id += 1
        return pid, pos

    def row(self, title: str) -> dict[str, Any]:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pid, pos = self.place(24, 1)
        self.x, self.y, self.row_h = 0, self.y + 1, 0
        return {"type": "row", "id": pid, "title": title, "gridPos": pos, "collapsed": False, "panels": []}


def _target(ref: str, expr: str, legend: str = "", *, instant: bool = False, table: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"refId": ref, "datasource": DATASOURCE, "expr": expr, "legendFormat": legend or "__auto"}
    if instant:
        t["instant"] = True
        t["range"] = False
    if table:
        t["format"] = "table"
    return t


def _panel(
    lay: _Layout,
    kind: str,
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    *,
    w: int = 12,
    h: int = 8,
    unit: str = "short",
    options: dict[str, Any] | None = None,
    custom: dict[str, Any] | None = None,
    thresholds: list[dict[str, Any]] | None = None,
    transformations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    pid, pos = lay.place(w, h)
    defaults: dict[str, Any] = {"unit": unit}
    if custom:
        defaults["custom"] = custom
    if thresholds:
        defaults["thresholds"] = {"mode": "absolute", "steps": thresholds}
    panel: dict[str, Any] = {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": pos,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options or {},
    }
    if transformations:
        panel["transformations"] = transformations
    return panel


_GREEN = {"color": "green", "value": None}
_STAT = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "background",
         "graphMode": "none", "textMode": "value_and_name"}
_LEGEND = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
           "tooltip": {"mode": "multi", "sort": "desc"}}
_BARS = {"drawStyle": "bars", "fillOpacity": 80, "stacking": {"mode": "normal", "group": "A"}}


def _dashboard(uid: str, title: str, description: str, panels: list[dict[str, Any]],
               variables: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["drmguard"],
        "timezone": "",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": variables or []},
        "annotations": {"list": [{
            "name": "Served version changes",
            "datasource": DATASOURCE,
            "enable": True,
            "iconColor": "blue",
            "expr": "changes(drmguard_model_version_changes_total[1m]) > 0",
            "titleFormat": "served version of {{model}} changed",
        }]},
        "links": [],
        "panels": panels,
    }


def overview() -> dict[str, Any]:
    """Scans, verdicts, queue, admitted/served versions and mitigations: was a backdoor caught?"""
    lay = _Layout()
    p: list[dict[str, Any]] = [lay.row("At a glance")]
    p.append(_panel(lay, "stat", "Server up", "1 when Prometheus scrapes the guard server.",
                    [_target("A", 'up{job="drmguard"}', "{{instance}}", instant=True)], w=4, h=4,
                    options=_STAT, thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}]))
    p.append(_panel(lay, "stat", "Backdoors caught (since server start)",
                    "Submitted models the scan found backdoored; none of them was admitted as submitted.",
                    [_target("A", "sum by (task) (drmguard_backdoors_detected_total)", "{{task}}", instant=True)],
                    w=6, h=4, options=_STAT,
                    thresholds=[_GREEN, {"color": "orange", "value": 1}]))
    p.append(_panel(lay, "stat", "Models served to vehicles",
                    "Models with an admitted version being served.",
                    [_target("A", "count(drmguard_served_model_info)", "served models", instant=True)],
                    w=4, h=4, options=_STAT, thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}]))
    p.append(_panel(lay, "stat", "Predict requests / s", "All models and versions.",
                    [_target("A", "sum(rate(drmguard_predict_requests_total[$__rate_interval]))", "rps")],
                    w=5, h=4, unit="reqps", options=_STAT, thresholds=[_GREEN]))
    p.append(_panel(lay, "stat", "Predict error ratio", "Share of Predict calls that did not return OK.",
                    [_target("A", 'sum(rate(drmguard_predict_requests_total{code!="OK"}[$__rate_interval]) '
                             'or rate(drmguard_predict_requests_total[$__rate_interval]) * 0)'
                             ' / sum(rate(drmguard_predict_requests_total[$__rate_interval]))', "errors")],
                    w=5, h=4, unit="percentunit", options=_STAT,
                    thresholds=[_GREEN, {"color": "orange", "value": 0.01}, {"color": "red", "value": 0.05}]))

    p.append(lay.row("Scans"))
    p.append(_panel(lay, "timeseries", "Scans by verdict",
                    "Finished scans per interval: benign (admitted), backdoored (caught), failed.",
                    [_target("A", "sum by (verdict) (increase(drmguard_scans_total[$__rate_interval]))",
                             "{{verdict}}")], custom=_BARS, options=_LEGEND))
    p.append(_panel(lay, "timeseries", "Scan and mitigation duration (p50, p90 over 1 h)",
                    "Scans are rare, so quantiles use a one-hour window; empty while nothing finished.",
                    [_target("A", "histogram_quantile(0.5, sum by (task, le) "
                             "(rate(drmguard_scan_duration_seconds_bucket[1h])))", "scan p50 {{task}}"),
                     _target("B", "histogram_quantile(0.9, sum by (task, le) "
                             "(rate(drmguard_scan_duration_seconds_bucket[1h])))", "scan p90 {{task}}"),
                     _target("C", "histogram_quantile(0.5, sum by (task, le) "
                             "(rate(drmguard_mitigation_duration_seconds_bucket[1h])))", "mitigation p50 {{task}}")],
                    unit="s", options=_LEGEND))
    p.append(_panel(lay, "timeseries", "Scan queue and scans in progress",
                    "Queued scans wait for a worker; a queue that only grows means workers are stuck or too few.",
                    [_target("A", "drmguard_scan_queue_depth", "queued"),
                     _target("B", "drmguard_scans_in_progress", "in progress")], options=_LEGEND))
    p.append(_panel(lay, "timeseries", "Last perturbation ratio per task",
                    "The scan statistic of the latest finished scan (small = trigger-like shortcut found).",
                    [_target("A", "drmguard_scan_last_perturbation_ratio", "{{task}}")], options=_LEGEND))

    p.append(lay.row("Models"))
    p.append(_panel(lay, "table", "Served version per model",
                    "The admitted version vehicles get when they name no version, with its execution provider.",
                    [_target("A", "max by (model, version, provider) (drmguard_served_model_info)", instant=True,
                             table=True)],
                    transformations=[{"id": "organize", "options": {
                        "excludeByName": {"Time": True, "Value": True}}}]))
    p.append(_panel(lay, "bargauge", "Admitted versions per model", "Versions that passed the scan (or mitigation).",
                    [_target("A", "max by (model) (drmguard_admitted_versions)", "{{model}}", instant=True)],
                    options={"orientation": "horizontal", "displayMode": "basic",
                             "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}))
    p.append(_panel(lay, "timeseries", "Served version changes",
                    "Admissions, pins and rollbacks that changed what vehicles get.",
                    [_target("A", "sum by (model) (increase(drmguard_model_version_changes_total[$__rate_interval]))",
                             "{{model}}")], custom=_BARS, options=_LEGEND, w=24, h=6))

    p.append(lay.row("Mitigations"))
    p.append(_panel(lay, "table", "Mitigations by outcome (since server start)",
                    "Backdoored models the service fine-tuned: admitted (passed the re-scan), rejected, failed.",
                    [_target("A", "sum by (task, outcome) (drmguard_mitigations_total)", instant=True, table=True)],
                    transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True}}}]))
    p.append(_panel(lay, "bargauge", "AE and DAE after mitigation (degrees)",
                    "Per admitted mitigated version: estimated attack error AE (high = trigger no longer works) "
                    "and defending error DAE (low = still accurate on clean inputs).",
                    [_target("A", "drmguard_mitigation_attack_error_degrees", "AE {{model}} v{{version}}",
                             instant=True),
                     _target("B", "drmguard_mitigation_defending_error_degrees", "DAE {{model}} v{{version}}",
                             instant=True)],
                    unit="degree", options={"orientation": "horizontal", "displayMode": "basic",
                                            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                                              "values": False}}))
    return _dashboard("drmguard-overview", "DRMGuard: guard overview",
                      "Was a backdoor caught, what is admitted and served, how the scan workers keep up.", p)


def inference() -> dict[str, Any]:
    """Predict traffic per model and version: rate, latency, errors, execution provider."""
    lay = _Layout()
    sel = 'model=~"$model"'
    p: list[dict[str, Any]] = [lay.row("Predict")]
    p.append(_panel(lay, "timeseries", "Predict requests / s per model and version", "",
                    [_target("A", f"sum by (model, version) (rate(drmguard_predict_requests_total{{{sel}}}"
                             "[$__rate_interval]))", "{{model}} v{{version}}")], unit="reqps", options=_LEGEND))
    p.append(_panel(lay, "timeseries", "Predict latency p50 / p99 per model and version",
                    "Server-side time of one Predict call, batch included. Objective: p99 <= 50 ms.",
                    [_target("A", f"histogram_quantile(0.5, sum by (model, version, le) "
                             f"(rate(drmguard_predict_latency_seconds_bucket{{{sel}}}[$__rate_interval])))",
                             "p50 {{model}} v{{version}}"),
                     _target("B", f"histogram_quantile(0.99, sum by (model, version, le) "
                             f"(rate(drmguard_predict_latency_seconds_bucket{{{sel}}}[$__rate_interval])))",
                             "p99 {{model}} v{{version}}")],
                    unit="s", options=_LEGEND))
    p.append(_panel(lay, "timeseries", "Predict error ratio per model and version",
                    "Share of calls not answered OK (objective <= 1%). Model `_unknown`: calls naming a model "
                    "that has no admitted version.",
                    [_target("A", f'sum by (model, version) (rate(drmguard_predict_requests_total{{{sel}, code!="OK"}}'
                             f"[$__rate_interval]) or rate(drmguard_predict_requests_total{{{sel}}}"
                             f"[$__rate_interval]) * 0) / sum by (model, version) "
                             f"(rate(drmguard_predict_requests_total{{{sel}}}[$__rate_interval]))",
                             "{{model}} v{{version}}")],
                    unit="percentunit", options=_LEGEND))
    p.append(_panel(lay, "timeseries", "Predict requests / s by status code", "",
                    [_target("A", f"sum by (code) (rate(drmguard_predict_requests_total{{{sel}}}[$__rate_interval]))",
                             "{{code}}")], unit="reqps", custom={"stacking": {"mode": "normal", "group": "A"},
                                                                "fillOpacity": 30}, options=_LEGEND))

    p.append(lay.row("Runtime"))
    p.append(_panel(lay, "table", "Execution provider in use",
                    "The ONNX Runtime provider the server actually got (CPUExecutionProvider on a GPU host means "
                    "a silent fallback), and the provider of each served version.",
                    [_target("A", "max by (provider) (drmguard_inference_execution_provider_info)", instant=True,
                             table=True),
                     _target("B", f"max by (model, version, provider) (drmguard_served_model_info{{{sel}}})",
                             instant=True, table=True)],
                    transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}]))
    p.append(_panel(lay, "table", "Build", "Server version and its Python and torch.",
                    [_target("A", "max by (version, python, torch) (drmguard_build_info)", instant=True,
                             table=True)],
                    transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}]))
    p.append(_panel(lay, "timeseries", "gRPC requests / s by method and code", "Every RPC, Predict included.",
                    [_target("A", "sum by (method, code) (rate(drmguard_grpc_requests_total[$__rate_interval]))",
                             "{{method}} {{code}}")], unit="reqps", options=_LEGEND))
    p.append(_panel(lay, "timeseries", "gRPC p99 duration by method", "",
                    [_target("A", "histogram_quantile(0.99, sum by (method, le) "
                             "(rate(drmguard_grpc_request_duration_seconds_bucket[$__rate_interval])))",
                             "{{method}}")], unit="s", options=_LEGEND))
    model_var = {
        "name": "model",
        "label": "Model",
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": "label_values(drmguard_predict_requests_total, model)", "refId": "model"},
        "definition": "label_values(drmguard_predict_requests_total, model)",
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }
    return _dashboard("drmguard-inference", "DRMGuard: inference",
                      "Are vehicles being served: Predict rate, latency and errors per model and version.", p,
                      [model_var])


DASHBOARDS = {"guard-overview.json": overview, "inference.json": inference}


def render(name: str) -> str:
    """The committed text of one dashboard file."""
    return json.dumps(DASHBOARDS[name](), indent=2, sort_keys=False) + "\n"


def main() -> int:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name in DASHBOARDS:
        (OUT_DIR / name).write_text(render(name))
        print(f"wrote {OUT_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
