"""The deployment files under deploy/ stay true to the code they deploy.

Metric names and label values in the alert rules and the dashboard are checked against the
sidecar's real ``/metrics`` exposition; the alert rules go through ``promtool`` (syntax, and
their behaviour on synthetic series); the sidecar configurations embedded in the Kubernetes
ConfigMap and the compose stack go through ``parse_config``; probes, ports and paths are
checked against ``build_admin_app`` and the configuration they run with.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.fernet import Fernet
from packaging.requirements import Requirement
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import METRICS, build_admin_app, build_app
from sidecar.cli import EXIT_CONFIG, main
from sidecar.config import Config, ConfigError, parse_config
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
DOCKERFILE = DEPLOY / "Dockerfile"
UNIT = DEPLOY / "systemd" / "sidecar.service"

# The scrape job the alerts and the dashboard select on.
JOB = "sidecar"
METRIC_NAME = re.compile(r"\bsidecar_[a-z_]+")
SELECTOR = re.compile(r"\b(sidecar_[a-z_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def _secrets_env(**extra: str) -> dict[str, str]:
    return {
        "SIDECAR_SESSION_KEY": Fernet.generate_key().decode(),
        "SIDECAR_DATA_KEY": Fernet.generate_key().decode(),
        **extra,
    }


def _yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    return path


def _run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=60)


# --- the sidecar's real metrics --------------------------------------------------------------


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, set[str]]]:
    """Every series name the sidecar exports, with the label values its series carry:
    ``{"sidecar_requests_total": {"decision": {"allowed", ...}}, ...}``. MFA and audit metrics
    are registered on the same registry by ``build_app``."""
    app = build_app(make_config(tmp_path_factory.mktemp("metrics"), "http://127.0.0.1:1"))
    body, _ = app[METRICS].exposition()
    names: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        if family.type == "counter":
            series = [f"{family.name}_total"]
        elif family.type == "histogram":
            series = [f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")]
        else:
            series = [family.name]
        for name in series:
            names.setdefault(name, {})
        for sample in family.samples:
            for label, value in sample.labels.items():
                names.setdefault(sample.name, {}).setdefault(label, set()).add(value)
    return names


def _alert_rules() -> list[dict[str, Any]]:
    (document,) = _yaml_documents(ALERTS)
    groups: list[dict[str, Any]] = document["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def _dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in _dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _dashboard_panels() for t in p.get("targets", [])]


def _all_exprs() -> list[tuple[str, str]]:
    alerts = [(f"alerts.yml {r['alert']}", str(r["expr"])) for r in _alert_rules()]
    panels = [
        (f"dashboard.json {p['title']!r}", t["expr"])
        for p in _dashboard_panels()
        for t in p.get("targets", [])
    ]
    return alerts + panels


def test_every_referenced_metric_is_exported(
    exposition: dict[str, dict[str, set[str]]],
) -> None:
    missing = [
        f"{where}: {name}"
        for where, expr in _all_exprs()
        for name in METRIC_NAME.findall(expr)
        if name not in exposition
    ]
    assert not missing, f"metrics the sidecar does not export: {missing}"


def _source_literals() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "sidecar").rglob("*.py"))


def test_every_label_value_in_a_selector_exists(
    exposition: dict[str, dict[str, set[str]]],
) -> None:
    """``decision="denied_ip"``, ``state="overdue"``...: a misspelt value selects nothing and
    the alert never fires. Values come from the exposition (label children are created up
    front); audit actions, created on first use, must be string literals in the code."""
    source = _source_literals()
    wrong = []
    for where, expr in _all_exprs():
        for name, matchers in SELECTOR.findall(expr):
            for label, op, value in MATCHER.findall(matchers):
                if label in ("job", "instance"):
                    continue
                values = value.split("|") if op in ("=~", "!~") else [value]
                known = exposition.get(name, {}).get(label)
                for v in values:
                    ok = v in known if known else f'"{v}"' in source
                    if not ok:
                        wrong.append(f"{where}: {name}{{{label}{op}{v!r}}}")
    assert not wrong, f"label values the sidecar never exports: {wrong}"


def test_selectors_name_the_scrape_job() -> None:
    for where, expr in _all_exprs():
        for name, matchers in SELECTOR.findall(expr):
            jobs = [v for label, _, v in MATCHER.findall(matchers) if label == "job"]
            assert jobs in ([JOB], ["$job"]), f"{where}: {name} must select job={JOB!r}"


# --- alert rules ---------------------------------------------------------------------------


def test_alert_rules_pass_promtool() -> None:
    result = _run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_are_complete() -> None:
    readme = (DEPLOY / "README.md").read_text()
    runbook = readme.split("## Operations runbook", 1)[1]
    (document,) = _yaml_documents(ALERTS)
    assert [g["name"] for g in document["groups"]] == ["sidecar"]
    for rule in _alert_rules():
        name = rule["alert"]
        assert rule.get("for"), f"{name}: no `for:`"
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        annotations = rule["annotations"]
        assert annotations["summary"], name
        assert annotations["description"], name
        anchor = f"deploy/README.md#{name.lower()} (Operations runbook)"
        assert annotations["runbook"] == anchor, name
        assert f"\n### {name}\n" in runbook, f"{name}: no entry in the README's runbook"


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    all_labels = {"job": JOB, "instance": "a:9090", **labels}
    text = ", ".join(f'{k}="{v}"' for k, v in all_labels.items())
    return {"series": f"{name}{{{text}}}", "values": values}


def _labels(**labels: str) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


ON_INSTANCE = _labels(instance="a:9090", job=JOB)
ON_JOB = _labels(job=JOB)
REQUESTS = "sidecar_requests_total"
LOCKOUTS = "sidecar_audit_events_total"
VERIFICATIONS = "sidecar_mfa_verifications_total"
RELOADS = "sidecar_config_reloads_total"

# (alert, input series at 1m steps, evaluation time, the labels it fires with or None).
ALERT_CASES: list[tuple[str, str, list[dict[str, str]], str, str | None]] = [
    ("down", "SidecarDown", [_series("up", "0x5")], "5m", ON_INSTANCE),
    ("up", "SidecarDown", [_series("up", "1x5")], "5m", None),
    (
        "no-target",
        "SidecarTargetsMissing",
        [{"series": 'up{job="other", instance="b:9090"}', "values": "1x5"}],
        "5m",
        ON_JOB,
    ),
    (
        "connect-errors",
        "SidecarUpstreamErrors",
        [_series("sidecar_upstream_errors_total", "0+60x10", kind="connect")],
        "10m",
        _labels(instance="a:9090", job=JOB, kind="connect"),
    ),
    (
        "rare-timeouts",
        "SidecarUpstreamErrors",
        [_series("sidecar_upstream_errors_total", "0+1x10", kind="timeout")],
        "10m",
        None,
    ),
    (
        "5xx-ratio",
        "SidecarErrorDecisionsHigh",
        [
            _series(REQUESTS, "0+600x30", decision="allowed"),
            _series(REQUESTS, "0+120x30", decision="upstream_error"),
        ],
        "30m",
        ON_INSTANCE,
    ),
    (
        "few-5xx",
        "SidecarErrorDecisionsHigh",
        [
            _series(REQUESTS, "0+600x30", decision="allowed"),
            _series(REQUESTS, "0+3x30", decision="store_unavailable"),
        ],
        "30m",
        None,
    ),
    (
        "identity",
        "SidecarIdentityUnavailable",
        [_series(REQUESTS, "0+5x10", decision="identity_unavailable")],
        "10m",
        ON_INSTANCE,
    ),
    (
        "store",
        "SidecarStoreUnavailable",
        [_series(REQUESTS, "0+5x10", decision="store_unavailable")],
        "10m",
        ON_INSTANCE,
    ),
    (
        "store-ok",
        "SidecarStoreUnavailable",
        [_series(REQUESTS, "0+5x10", decision="allowed")],
        "10m",
        None,
    ),
    (
        "audit",
        "SidecarAuditNotStored",
        [_series("sidecar_audit_store_failures_total", "0 0 0 1 1 1")],
        "5m",
        ON_INSTANCE,
    ),
    (
        "block-spike",
        "SidecarBlockSpike",
        # 0.1 blocked requests/s for 90 minutes, then 5/s.
        [_series(REQUESTS, "0+6x90 546+300x20", decision="denied_ip")],
        "100m",
        ON_JOB,
    ),
    (
        "steady-blocks",
        "SidecarBlockSpike",
        [_series(REQUESTS, "0+60x120", decision="not_allowlisted")],
        "110m",
        None,
    ),
    (
        "lockouts",
        "SidecarMfaLockoutSpike",
        [_series(LOCKOUTS, "0+1x30", action="mfa.lockout")],
        "30m",
        ON_JOB,
    ),
    (
        "locked-attempts",
        "SidecarMfaLockoutSpike",
        [_series(VERIFICATIONS, "0+2x30", method="totp", result="locked")],
        "30m",
        ON_JOB,
    ),
    (
        "failures-only",
        "SidecarMfaLockoutSpike",
        [
            _series(LOCKOUTS, "0+10x30", action="mfa.verify"),
            _series(VERIFICATIONS, "0+10x30", method="totp", result="failure"),
        ],
        "30m",
        None,
    ),
    (
        "reload-failed",
        "SidecarConfigReloadFailed",
        [_series(RELOADS, "0 0 0 1 1 1", result="failure")],
        "5m",
        ON_INSTANCE,
    ),
    (
        "reload-ok",
        "SidecarConfigReloadFailed",
        [_series(RELOADS, "0 0 0 1 1 1", result="success")],
        "5m",
        None,
    ),
    (
        "overdue",
        "SidecarMfaUsersOverdue",
        [_series("sidecar_mfa_users", "3x10", state="overdue")],
        "10m",
        ON_JOB,
    ),
    (
        "grace-only",
        "SidecarMfaUsersOverdue",
        [
            _series("sidecar_mfa_users", "5x10", state="grace"),
            _series("sidecar_mfa_users", "0x10", state="overdue"),
        ],
        "10m",
        None,
    ),
]


def test_every_alert_has_a_firing_case() -> None:
    firing = {alert for _, alert, _, _, labels in ALERT_CASES if labels is not None}
    assert firing == {rule["alert"] for rule in _alert_rules()}


@pytest.mark.parametrize(
    ("alert", "series", "eval_time", "fires_with"),
    [case[1:] for case in ALERT_CASES],
    ids=[case[0] for case in ALERT_CASES],
)
def test_alert_expression_on_synthetic_series(
    tmp_path: Path,
    alert: str,
    series: list[dict[str, str]],
    eval_time: str,
    fires_with: str | None,
) -> None:
    """Each alert's expression (read from alerts.yml, ``for:`` aside) against series shaped
    like the sidecar's, evaluated by promtool: it selects what it should, and only that."""
    (expr,) = [str(r["expr"]) for r in _alert_rules() if r["alert"] == alert]
    samples = [] if fires_with is None else [{"labels": fires_with, "value": 1}]
    case = {
        "interval": "1m",
        "input_series": series,
        # `* 0 + 1` keeps the labels of whatever the expression returns, not its values.
        "promql_expr_test": [
            {"expr": f"({expr.strip()}) * 0 + 1", "eval_time": eval_time, "exp_samples": samples}
        ],
    }
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(yaml.safe_dump({"tests": [case]}, sort_keys=False))
    result = _run_promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


# --- dashboard -----------------------------------------------------------------------------


# Every query runs on the data source picked in this variable: file provisioning and the
# Grafana operator load the JSON as it is (they never fill `__inputs` placeholders such as
# ${DS_PROMETHEUS}, which then name no data source), and the UI import asks nothing.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's own annotation source ("Annotations & Alerts"), built into every dashboard.
GRAFANA_BUILTIN = {"type": "grafana", "uid": "-- Grafana --"}


def _datasource_references(node: object, where: str = "") -> Iterator[tuple[str, object]]:
    """Every ``"datasource"`` value anywhere in the dashboard, with where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield where, value
            yield from _datasource_references(value, f"{where}/{node.get('title', key)}")
    elif isinstance(node, list):
        for item in node:
            yield from _datasource_references(item, where)


def test_dashboard_is_importable() -> None:
    dashboard = _dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = list(_dashboard_panels())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]


def test_dashboard_runs_on_the_datasource_variable() -> None:
    dashboard = _dashboard()
    variables = dashboard["templating"]["list"]
    pickers = [v for v in variables if v["type"] == "datasource"]
    assert [(v["name"], v["query"]) for v in pickers] == [("datasource", "prometheus")]
    # First, so that the job and instance variables' queries can run on it.
    assert variables[0] is pickers[0]
    # Nothing preset: Grafana picks the default Prometheus data source of wherever it lands.
    assert not pickers[0].get("current")
    for variable in variables:
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]
    for panel in _dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


def test_dashboard_names_no_datasource_of_its_own() -> None:
    """No hard-coded data source uid and no import-time placeholder anywhere in the JSON."""
    dashboard = _dashboard()
    assert "__inputs" not in dashboard
    assert "${DS_" not in DASHBOARD.read_text()
    wrong = [
        f"{where}: {ref}"
        for where, ref in _datasource_references(dashboard)
        if ref not in (DATASOURCE, GRAFANA_BUILTIN)
    ]
    assert not wrong, wrong


def test_dashboard_covers_every_metric_in_the_design() -> None:
    exprs = "\n".join(_dashboard_exprs())
    design = [
        "sidecar_requests_total",
        "sidecar_request_duration_seconds_bucket",
        "sidecar_upstream_duration_seconds_bucket",
        "sidecar_upstream_errors_total",
        "sidecar_ip_rules",
        "sidecar_mfa_enrollments_total",
        "sidecar_mfa_verifications_total",
        "sidecar_mfa_users",
        "sidecar_config_reloads_total",
        "sidecar_audit_events_total",
        "sidecar_build_info",
    ]
    assert [m for m in design if m not in METRIC_NAME.findall(exprs)] == []


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Grafana's variables replaced by plain values, each query checked as a recording rule."""
    substitutions = {"$__rate_interval": "5m", "$job": JOB, "$instance": ".*"}
    rules = []
    for i, expr in enumerate(_dashboard_exprs()):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    rules_file = tmp_path / "dashboard_rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run_promtool("check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr


# --- every YAML file -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml")),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_yaml_parses(path: Path) -> None:
    assert _yaml_documents(path), f"{path} is empty"


# --- Kubernetes ----------------------------------------------------------------------------

K8S_BASE = K8S / "base"
SERVICEMONITOR = K8S / "components" / "servicemonitor"
EXAMPLE_OVERLAY = K8S / "overlays" / "example"
SCRAPE = DEPLOY / "prometheus" / "scrape.yml"
# network.trusted_proxies in the ConfigMap until the operator fills it in: not a CIDR.
TRUSTED_PROXIES_PLACEHOLDER = "REPLACE-with-your-ingress-controller-CIDR"


def _kustomization(directory: Path) -> dict[str, Any]:
    kustomization: dict[str, Any] = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return kustomization


def _manifests(directory: Path) -> list[dict[str, Any]]:
    """The objects in a kustomization's own files (the directories it builds on aside)."""
    return [
        doc
        for name in _kustomization(directory)["resources"]
        if (directory / name).is_file()
        for doc in _yaml_documents(directory / name)
    ]


def _k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """The base's objects, the ServiceMonitor component's and the example overlay's Secret."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for directory in (K8S_BASE, SERVICEMONITOR, EXAMPLE_OVERLAY):
        for doc in _manifests(directory):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def _one(kind: str) -> dict[str, Any]:
    (obj,) = [o for (k, _), o in _k8s_objects().items() if k == kind]
    return obj


def _containers() -> dict[str, dict[str, Any]]:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"]}


def _container_port(container: Mapping[str, Any], port: int | str) -> int:
    """A port as a probe or Service names it (number or name), as the container's number."""
    for declared in container.get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            return int(declared["containerPort"])
    raise AssertionError(f"{container['name']} declares no port {port!r}")


def _configmap_yaml() -> str:
    text: str = _one("ConfigMap")["data"]["config.yaml"]
    return text


def _configmap_config(env: Mapping[str, str], trusted_proxies: str = "10.0.0.0/24") -> Config:
    """The ConfigMap's configuration as an operator completes it (trusted proxies filled in)."""
    text = _configmap_yaml()
    assert TRUSTED_PROXIES_PLACEHOLDER in text
    raw = yaml.safe_load(text.replace(TRUSTED_PROXIES_PLACEHOLDER, trusted_proxies))
    return parse_config(raw, env=env)


def _k8s_env() -> dict[str, str]:
    return _secrets_env(SIDECAR_STORAGE_URL="postgresql://sidecar:pw@postgres:5432/sidecar")


def _secret_refs() -> dict[str, tuple[str, str]]:
    """The sidecar's environment variables read from a Secret: name -> (Secret, key)."""
    refs = {}
    for variable in _containers()["sidecar"]["env"]:
        ref = variable.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            refs[variable["name"]] = (ref["name"], ref["key"])
    return refs


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it builds kustomizations offline)")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_every_kustomization_lists_its_manifests() -> None:
    for directory in (K8S_BASE, SERVICEMONITOR, EXAMPLE_OVERLAY):
        resources = _kustomization(directory)["resources"]
        files = {name for name in resources if (directory / name).is_file()}
        assert files == {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
        others = [name for name in resources if name not in files]
        assert all((directory / name / "kustomization.yaml").is_file() for name in others)
    assert _kustomization(SERVICEMONITOR)["kind"] == "Component"
    assert "../../base" in _kustomization(EXAMPLE_OVERLAY)["resources"]


def test_kustomize_builds(tmp_path: Path) -> None:
    base = sorted(doc["kind"] for doc in _kustomize(K8S_BASE))
    assert base == sorted(
        ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"]
    )
    assert sorted(d["kind"] for d in _kustomize(EXAMPLE_OVERLAY)) == sorted([*base, "Secret"])
    # An overlay adding the prometheus-operator component, as deploy/README.md shows it.
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    kustomization = {
        "resources": [os.path.relpath(K8S_BASE, overlay)],
        "components": [os.path.relpath(SERVICEMONITOR, overlay)],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    monitored = sorted(d["kind"] for d in _kustomize(overlay))
    assert monitored == sorted([*base, "Service", "ServiceMonitor"])


def test_base_never_overwrites_the_real_secret() -> None:
    """`kubectl apply -k` of the base leaves alone the Secret the operator created, and the
    documented command creates every key the sidecar reads from it."""
    assert "Secret" not in {doc["kind"] for doc in _manifests(K8S_BASE)}
    refs = _secret_refs()
    ((secret_name,),) = [{name for name, _ in refs.values()}]
    readme = (DEPLOY / "README.md").read_text()
    command = re.search(rf"kubectl create secret generic {secret_name}((?:.*\\\n)*.*)", readme)
    assert command, "deploy/README.md must show how to create the Secret"
    created = set(re.findall(r"--from-literal=(\w+)=", command.group(1)))
    assert created == {key for _, key in refs.values()}
    # The example overlay's Secret has the same shape, and values the sidecar refuses.
    example = _one("Secret")
    assert example["metadata"]["name"] == secret_name
    assert set(example["stringData"]) == created
    env = {variable: example["stringData"][key] for variable, (_, key) in refs.items()}
    with pytest.raises(ConfigError) as refused:
        _configmap_config(env)
    assert [p.split(":")[0] for p in refused.value.problems] == [
        "mfa.session.secret_keys[0]",
        "storage.encryption_key",
    ]
    assert all("is not a valid key" in p for p in refused.value.problems)


def test_configmap_is_a_valid_sidecar_config() -> None:
    config = _configmap_config(_k8s_env())
    # The kubelet probes the pod IP: a loopback-only admin listener would fail every probe.
    assert config.admin.host == "0.0.0.0"
    assert config.storage.url.startswith("postgresql://"), "replicas > 1 need PostgreSQL"
    console = _containers()["console"]
    assert config.upstream.url == f"http://127.0.0.1:{_container_port(console, 3000)}"


def test_configmap_refuses_to_start_until_trusted_proxies_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As shipped, the ConfigMap does not run with no trusted proxy (every request judged by
    the ingress controller's address): check-config, and so the sidecar's start, names the
    one key left to fill in."""
    path = tmp_path / "config.yaml"
    path.write_text(_configmap_yaml())
    for name, value in _k8s_env().items():
        monkeypatch.setenv(name, value)
    assert main(["check-config", str(path)]) == EXIT_CONFIG
    problem = f"network.trusted_proxies[0]: {TRUSTED_PROXIES_PLACEHOLDER!r} is not a CIDR"
    out, err = capsys.readouterr()
    assert problem in out + err
    with pytest.raises(ConfigError) as refused:
        parse_config(yaml.safe_load(_configmap_yaml()), env=_k8s_env())
    assert refused.value.problems == [problem]
    # Filled in, it is accepted, and those are the proxies believed.
    filled = _configmap_config(_k8s_env(), trusted_proxies="10.42.7.0/24")
    assert [str(cidr) for cidr in filled.network.trusted_proxies] == ["10.42.7.0/24"]


def test_configmap_secrets_come_from_the_secret() -> None:
    referenced = set(re.findall(r"\$\{(\w+)\}", _configmap_yaml()))
    assert referenced <= set(_secret_refs())


def test_container_ports_match_the_config() -> None:
    config = _configmap_config(_k8s_env())
    sidecar = _containers()["sidecar"]
    assert _container_port(sidecar, "http") == config.listen.port == 8080
    assert _container_port(sidecar, "admin") == config.admin.port == 9090
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    config_path = Path(sidecar["args"][sidecar["args"].index("--config") + 1])
    assert str(config_path.parent) in mounts
    assert _one("ConfigMap")["data"].get(config_path.name)


def test_service_targets_the_sidecar_not_the_console() -> None:
    service = _k8s_objects()[("Service", "console")]
    pod_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert _container_port(_containers()["sidecar"], port["targetPort"]) == 8080
    console_ports = {p["containerPort"] for p in _containers()["console"]["ports"]} | {
        p.get("name") for p in _containers()["console"]["ports"]
    }
    assert port["targetPort"] not in console_ports


def test_probes_use_the_admin_listener(tmp_path: Path) -> None:
    admin = build_admin_app(build_app(make_config(tmp_path, "http://127.0.0.1:1")))
    routes = {r.canonical for r in admin.router.resources()}
    sidecar = _containers()["sidecar"]
    expected = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path, probe
        assert path in routes, probe
        assert _container_port(sidecar, get["port"]) == 9090, probe


def test_sidecar_container_is_locked_down() -> None:
    deployment = _one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    sidecar = _containers()["sidecar"]
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in sidecar["volumeMounts"]}
    assert {"/var/lib/sidecar", "/tmp"} <= mounts
    # No CPU limit (throttling is latency on every request); a quarter core reserved.
    assert sidecar["resources"]["requests"]["cpu"] == "250m"
    assert set(sidecar["resources"]["limits"]) == {"memory"}
    # The drain must end before the kubelet kills: preStop pause + drain_timeout < grace.
    config = _configmap_config(_k8s_env())
    pause = int(sidecar["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pause + config.listen.drain_timeout < pod["terminationGracePeriodSeconds"]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# deploy/README.md's table "Memory": rules | RSS after start | peak under load | peak after
# reloads | suggested requests.memory | suggested limits.memory.
MEMORY_ROW = re.compile(
    r"^\| ([\d,]+) \| (\d+) MiB \| (\d+) MiB \| (\d+) MiB \| (\d+)Mi \| (\d+)Mi \|$", re.MULTILINE
)
# What the default cap of 10,000 open connections per process can add: ~9 KiB each, measured
# (deploy/README.md, "Memory").
CONNECTIONS_MIB = 10_000 * 9 / 1024


def test_memory_limit_leaves_headroom_over_the_measured_footprint() -> None:
    """An OOM kill drops every connection of the pod: each suggested limit is a quarter over
    the most the sidecar was measured to hold with that many rules plus full connection caps,
    each request over what it keeps after reloads, and the Deployment uses one of them, sized
    for 10,000 rules."""
    rows = {
        int(rules.replace(",", "")): (max(int(a), int(b), int(c)), int(request), int(limit))
        for rules, a, b, c, request, limit in MEMORY_ROW.findall((DEPLOY / "README.md").read_text())
    }
    assert {1_000, 10_000, 100_000} <= rows.keys()
    for rules, (peak, request, limit) in rows.items():
        assert request >= peak, f"{rules:,} rules: requests below what the sidecar keeps"
        assert limit >= 1.25 * (peak + CONNECTIONS_MIB), f"{rules:,} rules: limit too tight"
    memory = _containers()["sidecar"]["resources"]
    request, limit = memory["requests"]["memory"], memory["limits"]["memory"]
    assert (request, limit) in {(f"{r}Mi", f"{lim}Mi") for _, r, lim in rows.values()}
    assert int(limit.removesuffix("Mi")) >= rows[10_000][2]


def test_no_object_invites_annotation_scraping() -> None:
    """prometheus.io/* annotations make a generic job scrape the sidecar under its own job
    name, where no alert (they select job="sidecar") looks; next to scrape.yml or the
    ServiceMonitor they would scrape every pod twice."""
    for (kind, name), obj in _k8s_objects().items():
        template = obj.get("spec", {}).get("template", {})
        for metadata in (obj["metadata"], template.get("metadata", {})):
            annotations = metadata.get("annotations") or {}
            assert not [a for a in annotations if a.startswith("prometheus.io/")], f"{kind}/{name}"


def _relabel(labels: Mapping[str, str], configs: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' target relabelling, the actions scrape.yml uses: the target's labels, or
    None when it is dropped. Regexes are anchored at both ends, as Prometheus anchors them."""
    out = dict(labels)
    for config in configs:
        value = config.get("separator", ";").join(out.get(s, "") for s in config["source_labels"])
        match = re.fullmatch(config.get("regex", "(.*)"), value)
        action = config.get("action", "replace")
        if action == "keep" and match is None:
            return None
        if action == "drop" and match is not None:
            return None
        if action == "replace" and match is not None:
            template = re.sub(r"\$\{?(\d+)\}?", r"\\\1", config.get("replacement", "$1"))
            out[config["target_label"]] = match.expand(template)
        assert action in ("keep", "drop", "replace"), f"{action}: not modelled here"
    return out


def _discovered_targets(phase: str = "Running") -> list[dict[str, str]]:
    """What Kubernetes discovery (`role: pod`) offers for one of the Deployment's pods: a
    target for each port a container declares, with its meta labels."""
    pod = _one("Deployment")["spec"]["template"]["spec"]
    return [
        {
            "__address__": f"10.42.7.9:{port['containerPort']}",
            "__meta_kubernetes_namespace": "console",
            "__meta_kubernetes_pod_name": "console-7d9f-abcde",
            "__meta_kubernetes_pod_phase": phase,
            "__meta_kubernetes_pod_container_name": container["name"],
            "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
            "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
        }
        for container in pod["containers"]
        for port in container.get("ports", [])
    ]


def test_scrape_job_scrapes_each_pod_once_on_its_admin_port() -> None:
    (job,) = yaml.safe_load(SCRAPE.read_text())["scrape_configs"]
    assert job["job_name"] == JOB
    assert job["metrics_path"] == "/metrics"
    assert [sd["role"] for sd in job["kubernetes_sd_configs"]] == ["pod"]
    relabel = job["relabel_configs"]
    kept = [t for t in (_relabel(t, relabel) for t in _discovered_targets()) if t is not None]
    admin_port = _configmap_config(_k8s_env()).admin.port
    assert [t["__address__"] for t in kept] == [f"10.42.7.9:{admin_port}"], "one target a pod"
    assert (kept[0]["namespace"], kept[0]["pod"]) == ("console", "console-7d9f-abcde")
    assert all(_relabel(t, relabel) is None for t in _discovered_targets(phase="Succeeded"))


def test_scrape_job_passes_promtool(tmp_path: Path) -> None:
    result = _run_promtool("check", "config", str(SCRAPE))
    if "kubernetes_sd_configs not found" in result.stdout + result.stderr:
        # Debian's promtool is built without Kubernetes discovery: check the rest of the
        # job (relabelling, paths, intervals) around a static target instead.
        config = yaml.safe_load(SCRAPE.read_text())
        for job in config["scrape_configs"]:
            del job["kubernetes_sd_configs"]
            job["static_configs"] = [{"targets": ["10.42.7.9:9090"]}]
        (tmp_path / "scrape.yml").write_text(yaml.safe_dump(config))
        result = _run_promtool("check", "config", str(tmp_path / "scrape.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_servicemonitor_sets_the_job_on_the_admin_port() -> None:
    template = _one("Deployment")["spec"]["template"]
    metrics = _k8s_objects()[("Service", "console-sidecar-metrics")]
    assert metrics["spec"]["clusterIP"] == "None"
    assert metrics["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    (port,) = metrics["spec"]["ports"]
    assert _container_port(_containers()["sidecar"], port["targetPort"]) == 9090
    monitor = _one("ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"]
    assert endpoint["path"] == "/metrics"
    assert metrics["metadata"]["labels"][monitor["spec"]["jobLabel"]] == JOB


def test_disruption_budget_and_network_policy_select_the_pods() -> None:
    labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    for kind, selector in (
        ("PodDisruptionBudget", _one("PodDisruptionBudget")["spec"]["selector"]),
        ("NetworkPolicy", _one("NetworkPolicy")["spec"]["podSelector"]),
    ):
        assert selector["matchLabels"].items() <= labels.items(), kind
    allowed = {
        p["port"] for rule in _one("NetworkPolicy")["spec"]["ingress"] for p in rule["ports"]
    }
    assert allowed == {8080, 9090}, "the console's port must not be reachable around the sidecar"


# --- compose -------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    return compose


def test_compose_services() -> None:
    services = _compose()["services"]
    assert {"console", "sidecar", "postgres", "prometheus"} <= services.keys()
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        build = service.get("build")
        if build:
            assert (COMPOSE / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name}: {source} does not exist"
    depends = services["sidecar"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert services["postgres"]["image"].startswith("postgres:16")


def test_compose_console_stand_in_runs_the_demo_console() -> None:
    console = _compose()["services"]["console"]
    program, flag, code = console["entrypoint"]
    assert (program, flag) == ("python", "-c")
    compile(code, "<compose console>", "exec")
    assert "build_demo_console" in code
    assert "port=3000" in code


def test_compose_sidecar_config() -> None:
    services = _compose()["services"]
    sidecar = services["sidecar"]
    mounts = dict(v.split(":")[:2] for v in sidecar["volumes"])
    config_file = COMPOSE / next(s for s, target in mounts.items() if target.endswith(".yaml"))
    raw_text = config_file.read_text()
    # Every ${VAR} the file needs is passed to the container and listed in .env.example.
    needed = set(re.findall(r"\$\{(\w+)\}", raw_text))
    assert needed <= sidecar["environment"].keys()
    example = (COMPOSE / ".env.example").read_text()
    assert all(re.search(rf"^{name}=", example, re.MULTILINE) for name in needed)
    config = parse_config(yaml.safe_load(raw_text), env=_secrets_env())
    assert config.admin.host == "0.0.0.0"
    assert config.mfa.rp_id == "localhost"
    assert config.mfa.session.secure is False
    assert "http://localhost:8080" in str(config.mfa.origin)
    postgres = services["postgres"]["environment"]
    assert config.storage.url == (
        f"postgresql://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{postgres['POSTGRES_DB']}"
    )
    assert config.upstream.url == "http://console:3000"
    published = {p.rsplit(":", 1)[-1] for p in sidecar["ports"]}
    assert {str(config.listen.port), str(config.admin.port)} <= published
    grace = sidecar["stop_grace_period"]
    assert int(grace.rstrip("s")) > config.listen.drain_timeout


def test_compose_prometheus_scrapes_the_sidecar(tmp_path: Path) -> None:
    prometheus = _compose()["services"]["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prometheus["volumes"])
    scrape = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == JOB]
    config = parse_config(
        yaml.safe_load((COMPOSE / "sidecar.yaml").read_text()), env=_secrets_env()
    )
    assert job["static_configs"][0]["targets"] == [f"sidecar:{config.admin.port}"]
    # The rule file Prometheus loads is the alerts.yml mounted into it.
    (rule_file,) = scrape["rule_files"]
    source = next(s for s, target in mounts.items() if target == rule_file)
    assert (COMPOSE / source).resolve() == ALERTS
    # promtool checks the whole configuration, with the rule file where this machine has it.
    local = dict(scrape, rule_files=[str(ALERTS)])
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(local))
    result = _run_promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


# --- systemd -------------------------------------------------------------------------------


def _unit() -> dict[str, list[str]]:
    """``Key=value`` lines of the unit (a key may repeat, as systemd allows)."""
    keys: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        keys.setdefault(key, []).append(value)
    return keys


def test_systemd_unit_runs_and_reloads_the_sidecar() -> None:
    unit = _unit()
    (start,) = unit["ExecStart"]
    assert shlex.split(start)[1:] == ["run", "--config", "/etc/sidecar/config.yaml"]
    # A reload checks the file first (a bad one fails `systemctl reload` with its
    # messages), then signals the main process.
    check, signal = (shlex.split(r) for r in unit["ExecReload"])
    assert check[1:] == ["check-config", "/etc/sidecar/config.yaml"]
    assert signal[-2:] == ["-HUP", "$MAINPID"]
    # The sidecar reports READY=1 itself (sd_notify); only the main process (the workers'
    # supervisor) is listened to, and NOTIFY_SOCKET is an AF_UNIX socket.
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert "AF_UNIX" in unit["RestrictAddressFamilies"][0].split()
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["EnvironmentFile"] == ["/etc/sidecar/secrets.env"]
    assert unit["StateDirectory"] == ["sidecar"]
    assert unit["ConfigurationDirectory"] == ["sidecar"]
    # SIGTERM drains for listen.drain_timeout: systemd must wait longer before killing.
    default = make_config(Path("/tmp"), "http://127.0.0.1:1").listen.drain_timeout
    assert int(unit["TimeoutStopSec"][0]) > default


def test_systemd_unit_is_hardened() -> None:
    unit = _unit()
    expected = {
        "User": "sidecar",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "MemoryMax": "512M",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    assert "@system-service" in unit["SystemCallFilter"]


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify``: every directive known and well-formed (a misspelt one is
    only a warning to systemd, and silently ignored at run time)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package `systemd`)")
    # verify also checks that the commands exist: point them at one that does.
    unit = tmp_path / "sidecar.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/sidecar", shutil.which("true") or ""))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# --- Dockerfile ----------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        pending += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
            pending = ""
    return instructions


def test_dockerfile_runs_as_non_root() -> None:
    instructions = _dockerfile()
    final = [i for i, (word, _) in enumerate(instructions) if word == "FROM"][-1]
    runtime = instructions[final:]
    assert runtime[0][1].startswith("python:3.11-slim")
    users = [args for word, args in runtime if word == "USER"]
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid == "10001", "a numeric uid lets runAsNonRoot check it"


def test_dockerfile_entrypoint_health_and_ports() -> None:
    instructions = dict(_dockerfile())
    assert json.loads(instructions["ENTRYPOINT"]) == ["sidecar"]
    assert json.loads(instructions["CMD"]) == ["run", "--config", "/etc/sidecar/config.yaml"]
    assert instructions["EXPOSE"].split() == ["8080", "9090"]
    assert "PYTHONDONTWRITEBYTECODE=1" in instructions["ENV"]
    # The default storage.url keeps SQLite on the volume, the only writable place.
    default = parse_config({}, env=_secrets_env())
    assert json.loads(instructions["VOLUME"]) == ["/var/lib/sidecar"]
    assert default.storage.url.startswith("sqlite:////var/lib/sidecar/")
    health = instructions["HEALTHCHECK"]
    command = json.loads(health[health.index("CMD") + 3 :])
    assert command[:2] == ["python", "-c"]
    compile(command[2], "<healthcheck>", "exec")
    assert f"127.0.0.1:{default.admin.port}/healthz" in command[2]


def test_dockerfile_installs_from_the_repository() -> None:
    instructions = _dockerfile()
    for word, args in instructions:
        if word == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
        if word == "RUN" and "apt-get install" in args:
            assert "rm -rf /var/lib/apt/lists" in args, "apt lists left in the image"
    assert "sidecar" in (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1]


# --- locked inputs: base image digest, Python packages by hash ----------------------------

LOCK = DEPLOY / "requirements.lock"
BUILD_LOCK = DEPLOY / "build-requirements.lock"
PINNED_BASE = re.compile(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}")
# What pip-compile writes under a package for the requirements read from pyproject.toml.
VIA_PROJECT = "sidecar (pyproject.toml)"
VIA_BUILD_SYSTEM = "sidecar (pyproject.toml::build-system.requires)"


@dataclass(frozen=True)
class Locked:
    version: str
    hashes: list[str]
    via: list[str]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock(path: Path) -> dict[str, Locked]:
    """pip-compile's output: each ``name==version \\`` line, its ``--hash=`` lines and its
    ``# via`` comment (one line, or one name per ``#   `` line after it)."""
    entries: dict[str, Locked] = {}
    current: Locked | None = None
    for line in path.read_text().splitlines():
        text = line.strip().removesuffix("\\").strip()
        if re.match(r"[A-Za-z0-9]", line):
            name, _, version = text.partition("==")
            current = entries[_canonical(name)] = Locked(version, [], [])
        elif current is None or not line.startswith(" "):
            current = None  # the header, or a comment between entries
        elif text.startswith("--hash="):
            current.hashes.append(text.removeprefix("--hash="))
        elif text.startswith("# via"):
            current.via.extend(filter(None, [text.removeprefix("# via").strip()]))
        elif text.startswith("#   "):
            current.via.append(text.removeprefix("#").strip())
    return entries


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _check_lock(path: Path, requirements: list[str], root: str) -> None:
    """The lock pins exactly what ``requirements`` need, each release with its hashes."""
    locked = _lock(path)
    for name, entry in locked.items():
        assert re.fullmatch(r"\d[\w.+!]*", entry.version), f"{name}: not pinned with =="
        assert entry.hashes, f"{name}: no --hash (pip --require-hashes refuses the lock)"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in entry.hashes), name
    wanted = {_canonical(Requirement(r).name): Requirement(r) for r in requirements}
    direct = {name for name, entry in locked.items() if root in entry.via}
    assert direct == set(wanted), f"{path.name} was compiled from other requirements"
    for name, requirement in wanted.items():
        assert requirement.specifier.contains(locked[name].version, prereleases=True), (
            f"{name} {locked[name].version} is outside {requirement.specifier}"
        )
    # Everything else is there because a locked package depends on it.
    reachable, frontier = set(direct), set(direct)
    while frontier:
        frontier = {
            name
            for name, entry in locked.items()
            if name not in reachable and frontier & {_canonical(v) for v in entry.via}
        }
        reachable |= frontier
    assert reachable == set(locked), f"nothing needs {sorted(set(locked) - reachable)}"


def test_requirements_lock_covers_exactly_the_runtime_dependencies() -> None:
    """The image gets pyproject.toml's dependencies and the `speed` extra (uvloop), as the
    Dockerfile always installed, each at a version pyproject allows, and nothing else: not
    the test tools, not a package left over from a dependency since dropped."""
    project = _pyproject()["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["speed"]
    _check_lock(LOCK, requirements, VIA_PROJECT)


def test_build_lock_covers_the_build_backend() -> None:
    _check_lock(BUILD_LOCK, _pyproject()["build-system"]["requires"], VIA_BUILD_SYSTEM)


def test_lock_commands_are_documented() -> None:
    """Whoever changes a dependency finds in deploy/README.md the command that wrote the lock."""
    readme = (DEPLOY / "README.md").read_text()
    for path in (LOCK, BUILD_LOCK):
        command = re.search(r"^#    (pip-compile .*)$", path.read_text(), re.MULTILINE)
        assert command, f"{path.name} has no pip-compile header"
        assert command.group(1) in readme, f"{path.name}: its command is not in the README"
        assert f"--output-file={path.relative_to(ROOT)}" in command.group(1)


def test_dockerfile_builds_from_pinned_inputs() -> None:
    instructions = _dockerfile()
    bases = [args.split()[0] for word, args in instructions if word == "FROM"]
    assert len(bases) == 2, bases
    assert all(PINNED_BASE.fullmatch(base) for base in bases), f"not pinned by digest: {bases}"
    assert len(set(bases)) == 1, "both stages must use the same base image"
    commands = [
        shlex.split(command)
        for word, args in instructions
        if word == "RUN"
        for command in args.split("&&")
    ]
    installs = [c for c in commands if "install" in c and Path(c[0]).name == "pip"]
    hashed = [c for c in installs if "--require-hashes" in c]
    # Every package from a lock, checked against its hashes, none built from source...
    assert sorted(c[c.index("-r") + 1] for c in hashed) == sorted(
        str(p.relative_to(ROOT)) for p in (LOCK, BUILD_LOCK)
    )
    assert all("--only-binary=:all:" in c for c in hashed)
    # ...except the sidecar's own wheel, built here with the locked setuptools (an isolated
    # build would fetch an unpinned one) and installed without dependencies.
    (own,) = [c for c in installs if c not in hashed]
    assert "--no-deps" in own
    assert Path(own[-1]).name.startswith("sidecar-")
    (wheel,) = [c for c in commands if "wheel" in c and Path(c[0]).name == "pip"]
    assert {"--no-deps", "--no-build-isolation"} <= set(wheel)
    # A dependency in pyproject.toml that the lock lacks fails the build.
    assert any(Path(c[0]).name == "pip" and c[1:] == ["check"] for c in commands)
    copied = " ".join(args for word, args in instructions if word == "COPY")
    assert all(str(p.relative_to(ROOT)) in copied for p in (LOCK, BUILD_LOCK))


def test_deploy_readme_documents_the_build() -> None:
    readme = (DEPLOY / "README.md").read_text()
    assert "docker build -f deploy/Dockerfile -t sidecar ." in readme
    for section in ("## Kubernetes", "## Docker Compose", "## systemd", "## Docker", "## Upgrades"):
        assert section in readme


# Paths relative to deploy/, as deploy/README.md names them in backquotes.
DEPLOY_RELATIVE = re.compile(r"`((?:kubernetes|prometheus|grafana|compose|systemd)/[^`\s]*)`")


def test_paths_named_in_the_deploy_docs_exist() -> None:
    """An operator following a comment or the README to a file finds it (files move)."""
    documents = [ROOT / "README.md", DEPLOY / "README.md", DOCKERFILE]
    documents += [p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml")]
    missing = []
    for document in documents:
        text = document.read_text()
        for path in re.findall(r"\bdeploy/[\w./-]*\w", text):
            if not (ROOT / path).exists():
                missing.append(f"{document.relative_to(ROOT)}: {path}")
        if document == DEPLOY / "README.md":
            for path in DEPLOY_RELATIVE.findall(text):
                if not (DEPLOY / path).exists():
                    missing.append(f"deploy/README.md: {path}")
    assert not missing, missing


def test_alerts_name_the_scrape_configurations_that_set_their_job() -> None:
    """Whoever reads alerts.yml learns which scrape configurations give job="sidecar"."""
    header = ALERTS.read_text().split("\ngroups:", 1)[0]
    for path in (COMPOSE / "prometheus.yml", SCRAPE, SERVICEMONITOR):
        assert str(path.relative_to(ROOT)) in header, path
    assert "prometheus.io/scrape" in header
