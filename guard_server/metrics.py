"""Prometheus metrics of the guard server; the table in docs/design.md lists them.

Every name is written out in full here (no namespace/subsystem composition), so `grep` finds each one.
Model name and version appear as labels only for admitted, served versions (bounded by
``max_served_models``); unknown models are counted as ``model="_unknown"``.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

INFERENCE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
SCAN_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30, 300)


class Metrics:
    """Builds every metric in `registry` (tests pass a fresh one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.build_info = Gauge("drmguard_build_info", "Build information (value 1).",
                                ["version", "python", "torch"], registry=registry)
        self.scans = Counter("drmguard_scans_total", "Finished scans by task and verdict.",
                             ["task", "verdict"], registry=registry)
        self.scan_duration = Histogram("drmguard_scan_duration_seconds", "Wall time of one scan (excl. mitigation).",
                                       ["task"], buckets=SCAN_BUCKETS, registry=registry)
        self.mitigations = Counter("drmguard_mitigations_total", "Mitigations by task and outcome.",
                                   ["task", "outcome"], registry=registry)
        self.mitigation_duration = Histogram("drmguard_mitigation_duration_seconds",
                                             "Wall time of one mitigation including its re-scan.",
                                             ["task"], buckets=SCAN_BUCKETS, registry=registry)
        self.mitigation_attack_error = Gauge("drmguard_mitigation_attack_error_degrees",
                                             "Estimated attack error after mitigation (admitted mitigated versions).",
                                             ["model", "version"], registry=registry)
        self.mitigation_defending_error = Gauge("drmguard_mitigation_defending_error_degrees",
                                                "Defending attack error after mitigation (admitted mitigated versions).",
                                                ["model", "version"], registry=registry)
        self.queue_depth = Gauge("drmguard_scan_queue_depth", "Scans waiting for a worker.", registry=registry)
        self.scans_in_progress = Gauge("drmguard_scans_in_progress", "Scans running now.", registry=registry)
        self.last_perturbation_ratio = Gauge("drmguard_scan_last_perturbation_ratio",
                                             "Perturbation ratio of the last finished scan.", ["task"],
                                             registry=registry)
        self.admitted_versions = Gauge("drmguard_admitted_versions", "Admitted versions per model.", ["model"],
                                       registry=registry)
        self.served_model = Gauge("drmguard_served_model_info", "The served version of each model (value 1).",
                                  ["model", "version", "provider"], registry=registry)
        self.version_changes = Counter("drmguard_model_version_changes_total", "Switches of the served version.",
                                       ["model"], registry=registry)
        self.predict_requests = Counter("drmguard_predict_requests_total", "Predict and ModelInfer requests.",
                                        ["model", "version", "code"], registry=registry)
        self.predict_latency = Histogram("drmguard_predict_latency_seconds",
                                         "Server-side latency of successful Predict and ModelInfer requests.",
                                         ["model", "version"], buckets=INFERENCE_BUCKETS, registry=registry)
        self.grpc_requests = Counter("drmguard_grpc_requests_total", "gRPC requests by method and status code.",
                                     ["method", "code"], registry=registry)
        self.grpc_duration = Histogram("drmguard_grpc_request_duration_seconds", "gRPC handling time by method.",
                                       ["method"], buckets=RPC_BUCKETS, registry=registry)
        self.execution_provider = Gauge("drmguard_inference_execution_provider_info",
                                        "ONNX Runtime execution providers in use by served sessions (value 1).",
                                        ["provider"], registry=registry)
        self.backdoors_detected = Counter("drmguard_backdoors_detected_total", "Scans that found a backdoor.",
                                          ["task"], registry=registry)
        self.model_load_failures = Counter("drmguard_model_load_failures_total",
                                           "Admitted versions that failed to load or warm up.", ["reason"],
                                           registry=registry)
        self._set_build_info()

    def _set_build_info(self) -> None:
        from importlib import metadata

        def ver(dist: str) -> str:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                return ""

        self.build_info.labels(ver("drmguard-service"), platform.python_version(), ver("torch")).set(1)
