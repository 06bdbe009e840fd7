"""Static checks of deploy/: promtool on the committed Prometheus files, every YAML parses, dashboards are
consistent, and compose, Kubernetes and Dockerfiles name only paths, ports and images the project has.

The live counterpart (a real Prometheus scraping a real server) is test_ops_live.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from ops_harness import (
    DASHBOARD_FILES,
    DATASOURCE_UID,
    DEPLOY,
    PROM_CONFIG,
    REPO,
    RULE_FILES,
    dashboards,
    grafana_expr,
    load_yaml_docs,
    panels,
    rules,
    run_promtool,
)

YAML_FILES = sorted(p for ext in ("*.yml", "*.yaml") for p in DEPLOY.rglob(ext))
GRPC_PORT = 50051
METRICS_PORT = 9464
DATA_DIR = "/var/lib/drmguard"
IMAGE = "drmguard-service"
# Third-party images the deployment uses, pinned (never :latest).
UPSTREAM_IMAGES = {"prom/prometheus", "grafana/grafana"}
HEALTHCHECK_IN_IMAGE = "/opt/drmguard/healthcheck.py"


def design_metrics() -> set[str]:
    """Metric names from the table in docs/design.md ("Metrics")."""
    text = (REPO / "docs" / "design.md").read_text()
    names = set(re.findall(r"^\| `(drmguard_[a-z0-9_]+)` \|", text, flags=re.M))
    assert len(names) >= 15, "could not read the metrics table of docs/design.md"
    return names


def metric_names(expr: str) -> set[str]:
    """drmguard_* series names a PromQL expression selects, histogram suffixes folded to the family."""
    out = set()
    for name in re.findall(r"\bdrmguard_[a-z0-9_]+", expr):
        out.add(re.sub(r"_(bucket|count|sum)$", "", name) if re.search(r"_seconds_(bucket|count|sum)$", name)
                else name)
    return out


# ------------------------------------------------------------------------------------------ Prometheus


def test_promtool_check_config_on_committed_config() -> None:
    r = run_promtool("check", "config", str(PROM_CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr
    # The config loads the committed rule files, and only those.
    assert "SUCCESS: 1 rule files found" in r.stdout + r.stderr, r.stdout + r.stderr


def test_promtool_check_rules_on_committed_rules() -> None:
    assert RULE_FILES, "no rule files under deploy/prometheus/rules"
    r = run_promtool("check", "rules", *map(str, RULE_FILES))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_deploy_yaml_parses_and_prometheus_ones_pass_promtool(path: Path) -> None:
    docs = load_yaml_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        if isinstance(doc, dict) and "scrape_configs" in doc:
            r = run_promtool("check", "config", str(path))
            assert r.returncode == 0, f"{path}: {r.stdout}{r.stderr}"
        if isinstance(doc, dict) and "groups" in doc:
            r = run_promtool("check", "rules", str(path))
            assert r.returncode == 0, f"{path}: {r.stdout}{r.stderr}"


def test_no_embedded_copies_of_prometheus_or_grafana_files() -> None:
    """Compose and Kubernetes mount the committed files; none carries its own copy."""
    for path in YAML_FILES:
        if path.parent in (PROM_CONFIG.parent, PROM_CONFIG.parent / "rules") or "grafana" in path.parts:
            continue
        text = path.read_text()
        for marker in ("scrape_configs", "alert: DRMGuard", '"panels"', "datasources:"):
            assert marker not in text, f"{path} embeds {marker!r}: mount the file from deploy/ instead"


def test_alert_rules_cover_the_on_call_cases_and_have_runbook_sections() -> None:
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    wanted = {
        "backdoor detected": "drmguard_backdoors_detected_total",
        "scans failing": 'verdict="failed"',
        "queue backing up": "drmguard_scan_queue_depth",
        "scan running long": "drmguard_scans_in_progress",
        "predict error ratio": 'code!="OK"',
        "predict latency": "drmguard_predict_latency_seconds_bucket",
        "served version changed": "drmguard_model_version_changes_total",
        "server down": 'up{job="drmguard"}',
    }
    for case, needle in wanted.items():
        assert any(needle in r["expr"] for r in alerts.values()), f"no alert rule for {case} ({needle})"
    runbook = (REPO / "docs" / "runbook.md").read_text()
    headings = {h.strip().lower() for h in re.findall(r"^### (\S+)\s*$", runbook, flags=re.M)}
    known = design_metrics()
    for name, rule in alerts.items():
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, name
        ann = rule.get("annotations", {})
        assert ann.get("summary") and ann.get("description"), f"{name}: summary and description needed"
        assert ann.get("runbook_url") == f"docs/runbook.md#{name.lower()}", name
        assert name.lower() in headings, f"docs/runbook.md has no '### {name}' section"
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{name} uses metrics not in docs/design.md: {unknown}"


# ------------------------------------------------------------------------------------------ Grafana


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("drmguard_dashboards", DEPLOY / "grafana" / "dashboards.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_committed_dashboards_equal_the_generator_output() -> None:
    gen = _generator()
    assert sorted(p.name for p in DASHBOARD_FILES) == sorted(gen.DASHBOARDS)
    for path in DASHBOARD_FILES:
        assert path.read_text() == gen.render(path.name), (
            f"{path} differs from deploy/grafana/dashboards.py: run `python deploy/grafana/dashboards.py`")


def test_datasource_uid_is_pinned_everywhere() -> None:
    (ds_file,) = (DEPLOY / "grafana" / "provisioning" / "datasources").glob("*.yaml")
    (ds,) = load_yaml_docs(ds_file)[0]["datasources"]
    assert ds["uid"] == DATASOURCE_UID and ds["type"] == "prometheus"
    pinned = {"type": "prometheus", "uid": DATASOURCE_UID}
    for name, dash in dashboards().items():
        for p in panels(dash):
            assert p.get("datasource") == pinned, f"{name}: panel {p['title']!r} datasource {p.get('datasource')}"
            for t in p["targets"]:
                assert t.get("datasource") == pinned, f"{name}: {p['title']!r} target {t['refId']}"
        for v in dash["templating"]["list"]:
            if v["type"] == "query":
                assert v["datasource"] == pinned, f"{name}: variable {v['name']}"


def test_dashboards_show_what_the_issue_asks_and_use_known_metrics() -> None:
    known = design_metrics()
    exprs: list[str] = []
    for name, dash in dashboards().items():
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        assert dash["uid"] and len(dash["uid"]) <= 40
        for p in panels(dash):
            assert p["targets"], f"{name}: panel {p['title']!r} has no queries"
            for t in p["targets"]:
                assert t["expr"].strip(), f"{name}: {p['title']!r} has an empty expr"
                unknown = metric_names(t["expr"]) - known
                assert not unknown, f"{name}: {p['title']!r} uses metrics not in docs/design.md: {unknown}"
                exprs.append(t["expr"])
    joined = "\n".join(exprs)
    for needle in ("drmguard_scans_total", "drmguard_scan_duration_seconds_bucket", "drmguard_scan_queue_depth",
                   "drmguard_scans_in_progress", "drmguard_admitted_versions", "drmguard_served_model_info",
                   "drmguard_mitigation_attack_error_degrees", "drmguard_mitigation_defending_error_degrees",
                   "drmguard_predict_requests_total", "histogram_quantile(0.5", "histogram_quantile(0.99",
                   "drmguard_inference_execution_provider_info", "drmguard_backdoors_detected_total"):
        assert needle in joined, f"no dashboard query uses {needle}"


def test_dashboard_queries_parse_offline(tmp_path: Path) -> None:
    """promtool parses each query (variables substituted) as a recording rule: no server needed."""
    rules_doc: dict[str, Any] = {"groups": []}
    for name, dash in dashboards().items():
        group = {"name": name, "rules": []}
        for p in panels(dash):
            for t in p["targets"]:
                group["rules"].append({"record": f"panel_{p['id']}_{t['refId']}", "expr": grafana_expr(t["expr"])})
        for a in dash["annotations"]["list"]:
            group["rules"].append({"record": "annotation", "expr": grafana_expr(a["expr"])})
        rules_doc["groups"].append(group)
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules_doc))
    r = run_promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_provisioning_points_at_the_mounted_dashboards() -> None:
    (prov,) = load_yaml_docs(DEPLOY / "grafana" / "provisioning" / "dashboards" / "drmguard.yaml")
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"
    (ds,) = load_yaml_docs(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"


# ------------------------------------------------------------------------------------------ Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def manual_install_commands(flavour: str) -> list[str]:
    """The pip commands of the "Manual install" code block for `flavour` (CPU / CUDA) in docs/operations.md."""
    text = (REPO / "docs" / "operations.md").read_text()
    section = text.split("## Manual install", 1)[1].split("\n## ", 1)[0]
    block = re.search(rf"### {flavour}\b.*?```(?:bash|sh)\n(.*?)```", section, flags=re.S)
    assert block, f"docs/operations.md: no '### {flavour}' code block under '## Manual install'"
    return [ln.strip() for ln in block.group(1).splitlines() if ln.strip().startswith("pip ")]


def readme_install_commands() -> list[list[str]]:
    """The pip commands of each code block under the README's "## Manual install"."""
    text = (REPO / "README.md").read_text()
    assert "## Manual install" in text, "README.md has no '## Manual install' section"
    section = text.split("## Manual install", 1)[1].split("\n## ", 1)[0]
    return [[ln.strip() for ln in b.splitlines() if ln.strip().startswith("pip ")]
            for b in re.findall(r"```(?:bash|sh)\n(.*?)```", section, flags=re.S)]


def test_readme_gives_the_same_manual_install_as_the_images() -> None:
    blocks = readme_install_commands()
    assert manual_install_commands("CPU") in blocks, "README 'Manual install' lacks the CPU commands of the image"
    readme = (REPO / "README.md").read_text()
    # The CUDA commands live in docs/operations.md; the README either repeats them or points there.
    assert manual_install_commands("CUDA") in blocks or "docs/operations.md" in readme


@pytest.mark.parametrize("flavour,device", [("cpu", "cpu"), ("cuda", "cuda")])
def test_dockerfile(flavour: str, device: str) -> None:
    path = DEPLOY / "docker" / f"Dockerfile.{flavour}"
    ins = dockerfile_instructions(path)
    kinds = [k for k, _ in ins]
    # Base image pinned to a tag.
    (base,) = [a for k, a in ins if k == "FROM"]
    assert ":" in base and not base.endswith(":latest"), base
    # Every COPY source exists in the build context (the repository root).
    for k, a in ins:
        if k == "COPY":
            *srcs, _dest = shlex.split(a)
            for src in srcs:
                if not src.startswith("--"):
                    assert (REPO / src).exists(), f"{path.name}: COPY {src}: no such path in the repository"
    # The pip commands are the manual-install commands, in order and word for word.
    pip_runs = [a for k, a in ins if k == "RUN" and a.startswith("pip ")]
    assert pip_runs == manual_install_commands(flavour.upper()), (
        f"{path.name} pip commands differ from docs/operations.md 'Manual install' ({flavour.upper()})")
    # Non-root, data on a volume, health through grpc.health.v1, the server as entry point.
    (user,) = [a for k, a in ins if k == "USER"]
    assert user.split(":")[0] not in ("root", "0")
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")
    assert json.loads(dict(ins)["VOLUME"]) == [DATA_DIR]
    health = dict(ins)["HEALTHCHECK"]
    assert f'"{HEALTHCHECK_IN_IMAGE}"' in health and f"127.0.0.1:{GRPC_PORT}" in health
    assert any(k == "COPY" and a.split()[-1] == HEALTHCHECK_IN_IMAGE for k, a in ins)
    assert json.loads(dict(ins)["ENTRYPOINT"]) == ["drmguard-server"]
    assert json.loads(dict(ins)["CMD"]) == server_args(device)
    assert sorted(map(int, dict(ins)["EXPOSE"].split())) == sorted([GRPC_PORT, METRICS_PORT])


def server_args(device: str) -> list[str]:
    return ["--listen", f"0.0.0.0:{GRPC_PORT}", "--metrics-port", str(METRICS_PORT), "--metrics-host", "0.0.0.0",
            "--data-dir", DATA_DIR,
            "--device", device]


def server_help() -> str:
    """`drmguard-server --help`, the authority on which options exist."""
    exe = Path(sys.executable).with_name("drmguard-server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "guard_server.cli"]
    r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, f"drmguard-server --help failed (is the server installed?):\n{r.stderr[-2000:]}"
    return r.stdout


def test_server_cli_takes_the_flags_and_settings_the_deployment_passes() -> None:
    """The flags compose, Kubernetes and the images pass, and the keys of k8s/server.toml, are real options."""
    import tomllib

    help_text = server_help()
    flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))
    for device in ("cpu", "cuda"):
        for arg in server_args(device):
            if arg.startswith("--"):
                assert arg in flags, f"drmguard-server has no {arg} option"
    cfg = tomllib.loads((DEPLOY / "k8s" / "server.toml").read_text())["server"]
    for key in cfg:
        assert "--" + key.replace("_", "-") in flags, f"deploy/k8s/server.toml: {key} is not a server setting"
    assert "GUARD_" in help_text  # settings also come from GUARD_* (the k8s Deployment sets GUARD_CONFIG)


# ------------------------------------------------------------------------------------------ compose


def _image_ok(image: str) -> None:
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest", f"image {image!r} must be pinned to a tag"
    assert name == IMAGE or name in UPSTREAM_IMAGES, f"image {image!r} is neither built here nor an allowed upstream"
    if name == IMAGE:  # tagged <package version>-<cpu|cuda>
        import tomllib

        version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
        assert tag in (f"{version}-cpu", f"{version}-cuda"), f"image {image!r}: tag must be {version}-cpu|cuda"


def test_compose_files_name_only_real_paths_ports_and_images() -> None:
    (compose,) = load_yaml_docs(DEPLOY / "compose.yaml")
    (gpu,) = load_yaml_docs(DEPLOY / "compose.gpu.yaml")
    services = compose["services"]
    assert set(services) == {"drmguard", "prometheus", "grafana"}
    named_volumes = set(compose.get("volumes", {}))
    for override, device in ((services["drmguard"], "cpu"), (gpu["services"]["drmguard"], "cuda")):
        build = override["build"]
        assert (DEPLOY / build["context"]).resolve() == REPO
        assert (REPO / build["dockerfile"]).is_file()
        assert build["dockerfile"].endswith(device)
        assert override["image"].endswith(f"-{device}")
        assert override["command"] == server_args(device)
    for doc in (compose, gpu):
        for name, svc in doc["services"].items():
            if "image" in svc:
                _image_ok(svc["image"])
            for vol in svc.get("volumes", []):
                src = vol.split(":")[0]
                if src.startswith("."):
                    assert (DEPLOY / src).exists(), f"compose {name}: mounts missing path {src}"
                else:
                    assert src in named_volumes, f"compose {name}: unknown volume {src}"
    # Without auth the server only listens on loopback: compose hands it a tokens file as a secret.
    guard = services["drmguard"]
    assert guard["environment"]["GUARD_TOKENS_FILE"] == "/run/secrets/drmguard-tokens"
    assert guard["secrets"] == ["drmguard-tokens"]
    assert compose["secrets"]["drmguard-tokens"]["file"].startswith("${DRMGUARD_TOKENS_FILE:?")
    published = {int(p.split(":")[-1]) for p in services["drmguard"]["ports"]}
    assert published == {GRPC_PORT, METRICS_PORT}
    assert any(v.endswith(f":{DATA_DIR}") for v in services["drmguard"]["volumes"])
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in services["grafana"]["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in services["grafana"]["volumes"]
    # Prometheus scrapes the compose service on the port the server is told to use.
    (prom,) = load_yaml_docs(PROM_CONFIG)
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "drmguard")
    assert job["static_configs"][0]["targets"] == [f"drmguard:{METRICS_PORT}"]


# ------------------------------------------------------------------------------------------ Kubernetes


def kustomize_build(path: Path) -> list[dict[str, Any]]:
    """A small, offline stand-in for `kustomize build`: loads resources (recursively) and generators.

    Checks every referenced file exists below the kustomization (kustomize's default load restriction);
    ConfigMaps from configMapGenerator come back with their data read from the committed files.
    """
    (k,) = load_yaml_docs(path / "kustomization.yaml")
    objs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        target = (path / res).resolve()
        if target.is_dir():
            objs.extend(kustomize_build(target))
            continue
        assert target.is_file(), f"{path}/kustomization.yaml: resource {res} does not exist"
        assert path.resolve() in target.parents, f"{res} is outside {path}: kustomize would refuse to load it"
        objs.extend(load_yaml_docs(target))
    for gen in k.get("configMapGenerator", []):
        data = {}
        for entry in gen["files"]:
            key, _, rel = entry.rpartition("=")
            f = (path / rel).resolve()
            assert f.is_file(), f"configMapGenerator {gen['name']}: {rel} does not exist"
            assert path.resolve() in f.parents, f"{rel} is outside {path}: kustomize would refuse to load it"
            data[key or f.name] = f.read_text()
        objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for patch in k.get("patches", []):
        assert (path / patch["path"]).is_file(), f"patch {patch['path']} missing"
        t = patch["target"]
        assert any(o["kind"] == t["kind"] and o["metadata"]["name"] == t["name"] for o in objs), t
    return objs


def _deployment(objs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == name)


def test_kubernetes_manifests_are_consistent() -> None:
    objs = kustomize_build(DEPLOY)
    for o in objs:
        assert o.get("apiVersion") and o.get("kind") and o["metadata"].get("name"), o
    by_kind: dict[str, set[str]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], set()).add(o["metadata"]["name"])
    assert {"drmguard", "prometheus", "grafana"} <= by_kind["Deployment"]
    assert {"drmguard", "prometheus", "grafana"} <= by_kind["Service"]
    assert {"drmguard-store", "prometheus-data"} <= by_kind["PersistentVolumeClaim"]
    configmaps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
    # The generated ConfigMaps carry the committed files themselves.
    assert configmaps["prometheus-config"]["data"]["prometheus.yml"] == PROM_CONFIG.read_text()
    for f in DASHBOARD_FILES:
        assert configmaps["grafana-dashboards"]["data"][f.name] == f.read_text()
    # Secrets are created by the operator (docs/operations.md), never committed.
    assert "Secret" not in by_kind
    documented_secrets = set(re.findall(r"create secret generic ([a-z0-9-]+)",
                                        (REPO / "docs" / "operations.md").read_text()))
    for dep_name in by_kind["Deployment"]:
        spec = _deployment(objs, dep_name)["spec"]["template"]["spec"]
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in configmaps, f"{dep_name}: unknown ConfigMap {vol}"
            if "secret" in vol:
                assert vol["secret"]["secretName"] in documented_secrets, f"{dep_name}: undocumented {vol}"
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in by_kind["PersistentVolumeClaim"]
        for c in spec["containers"]:
            _image_ok(c["image"])
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in documented_secrets, f"{dep_name}: undocumented secret {ref['name']}"

    guard = _deployment(objs, "drmguard")
    pod = guard["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["args"] == server_args("cpu")
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORT)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        cmd = c[probe]["exec"]["command"]
        assert cmd[:2] == ["python", HEALTHCHECK_IN_IMAGE] and f"127.0.0.1:{GRPC_PORT}" in cmd, probe
    assert "--service" in c["readinessProbe"]["exec"]["command"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["resources"]["requests"] and c["resources"]["limits"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert DATA_DIR in mounts
    # The server config in the ConfigMap agrees with the args and points at the mounted secrets.
    import tomllib

    cfg = tomllib.loads(configmaps["drmguard-config"]["data"]["server.toml"])["server"]
    assert cfg["listen"] == f"0.0.0.0:{GRPC_PORT}" and cfg["metrics_port"] == METRICS_PORT
    assert cfg["data_dir"] == DATA_DIR
    for key in ("tls_cert", "tls_key", "tls_client_ca", "tokens_file"):
        assert any(cfg[key].startswith(m + "/") for m in mounts), f"server.toml {key} is not under a mount"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["GUARD_CONFIG"] == "/etc/drmguard/config/server.toml"

    # The Service and the Prometheus/Grafana wiring use the same names and ports.
    svc = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "drmguard")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    prom = _deployment(objs, "prometheus")["spec"]["template"]["spec"]["containers"][0]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["args"]
    assert {m["mountPath"] for m in prom["volumeMounts"]} >= {"/etc/prometheus", "/etc/prometheus/rules"}
    graf = _deployment(objs, "grafana")["spec"]["template"]["spec"]["containers"][0]
    assert "/var/lib/grafana/dashboards/drmguard" in {m["mountPath"] for m in graf["volumeMounts"]}


def test_kubernetes_gpu_overlay_requests_a_gpu() -> None:
    overlay = DEPLOY / "k8s" / "overlays" / "gpu"
    objs = kustomize_build(overlay)
    assert _deployment(objs, "drmguard")
    (patch,) = load_yaml_docs(overlay / "gpu-patch.yaml")
    (c,) = patch["spec"]["template"]["spec"]["containers"]
    assert c["args"] == server_args("cuda")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    (k,) = load_yaml_docs(overlay / "kustomization.yaml")
    assert k["images"] == [{"name": IMAGE, "newTag": "0.1.0-cuda"}]
    (compose_gpu,) = load_yaml_docs(DEPLOY / "compose.gpu.yaml")
    assert compose_gpu["services"]["drmguard"]["image"] == f"{IMAGE}:0.1.0-cuda"


def test_servicemonitor_selects_the_metrics_port() -> None:
    (sm,) = load_yaml_docs(DEPLOY / "k8s" / "servicemonitor.yaml")
    assert sm["kind"] == "ServiceMonitor"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "drmguard"}
