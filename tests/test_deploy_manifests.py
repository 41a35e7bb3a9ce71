"""The deployment files say what the code expects: probes on the routes that exist, env vars the
settings read, a grace period longer than the worker's drain, autoscaling within the partitions,
and a compose file whose workers can be scaled.

Pure file checks: no cluster, no Docker, no services needed.
"""

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from shared.broker import Topology
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "docker-compose.yml"

SETTINGS_ENV_VARS = frozenset(name.upper() for name in Settings.model_fields)
WORKER_DRAIN_S = 10

Manifest = dict[str, Any]


def _load_manifests() -> list[tuple[Path, Manifest]]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                documents.append((path, document))
    return documents


@pytest.fixture(scope="module")
def manifests() -> list[tuple[Path, Manifest]]:
    return _load_manifests()


def _find(manifests: list[tuple[Path, Manifest]], kind: str, name: str) -> Manifest:
    found = [doc for _, doc in manifests if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind} {name!r}, found {len(found)}"
    return found[0]


def _only_container(deployment: Manifest) -> Manifest:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: Manifest = containers[0]
    return container


def _port_number(container: Manifest, port: int | str) -> int:
    """A probe's or a Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert named, f"no container port named {port!r}"
    number: int = named[0]
    return number


def _env(container: Manifest) -> dict[str, Manifest]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def _pod_specs(manifests: list[tuple[Path, Manifest]]) -> Iterator[tuple[str, Manifest]]:
    for _, doc in manifests:
        if doc["kind"] in {"Deployment", "Job"}:
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def config(manifests: list[tuple[Path, Manifest]]) -> dict[str, str]:
    data: dict[str, str] = _find(manifests, "ConfigMap", "ticketing-config")["data"]
    return data


@pytest.fixture(scope="module")
def api(manifests: list[tuple[Path, Manifest]]) -> Manifest:
    return _find(manifests, "Deployment", "ticketing-api")


@pytest.fixture(scope="module")
def worker(manifests: list[tuple[Path, Manifest]]) -> Manifest:
    return _find(manifests, "Deployment", "ticketing-worker")


@pytest.fixture(scope="module")
def scaled_object(manifests: list[tuple[Path, Manifest]]) -> Manifest:
    return _find(manifests, "ScaledObject", "ticketing-worker")


@pytest.fixture(scope="module")
def compose() -> Manifest:
    document: Manifest = yaml.safe_load(COMPOSE.read_text())
    return document


# --- Kubernetes: the files as a whole ------------------------------------------------------------


def test_every_manifest_has_an_api_version_kind_and_name(
    manifests: list[tuple[Path, Manifest]],
) -> None:
    assert manifests
    for path, doc in manifests:
        assert doc.get("apiVersion"), path
        assert doc.get("kind"), path
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], path


def test_kustomization_applies_every_manifest_except_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert resources == on_disk - {"secret.example.yaml"}


def test_secret_example_is_marked_as_an_example_and_holds_placeholders_only() -> None:
    text = (K8S / "secret.example.yaml").read_text()
    assert "EXAMPLE" in text.splitlines()[0]
    secret = yaml.safe_load(text)
    assert secret["kind"] == "Secret"
    for key, value in secret["stringData"].items():
        assert "CHANGE-ME" in value, f"{key} looks like a real value"


def test_deployment_selectors_match_their_pod_labels(
    manifests: list[tuple[Path, Manifest]],
) -> None:
    for _, doc in manifests:
        if doc["kind"] == "Deployment":
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), doc["metadata"]["name"]


# --- API ---------------------------------------------------------------------------------------


def test_api_runs_two_replicas_of_python_m_api_on_all_interfaces(api: Manifest) -> None:
    container = _only_container(api)
    assert api["spec"]["replicas"] == 2
    assert container["image"] == "ticketing:latest"
    assert container["command"] == ["python", "-m", "api"]
    assert _env(container)["API_HOST"]["value"] == "0.0.0.0"
    assert [p["containerPort"] for p in container["ports"]] == [8000]


def test_api_probes_liveness_on_healthz_and_readiness_on_readyz_at_port_8000(
    api: Manifest,
) -> None:
    container = _only_container(api)
    liveness = container["livenessProbe"]["httpGet"]
    readiness = container["readinessProbe"]["httpGet"]
    assert liveness["path"] == "/healthz"
    assert readiness["path"] == "/readyz"
    assert _port_number(container, liveness["port"]) == 8000
    assert _port_number(container, readiness["port"]) == 8000


def test_api_has_resource_requests_and_a_256mi_memory_limit(api: Manifest) -> None:
    resources = _only_container(api)["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert resources["limits"]["memory"] == "256Mi"


def test_api_pods_are_scraped_by_prometheus_on_the_api_port(api: Manifest) -> None:
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8000"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_api_service_maps_port_80_to_the_api_container_port_8000(
    manifests: list[tuple[Path, Manifest]], api: Manifest
) -> None:
    service = _find(manifests, "Service", "ticketing-api")
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    assert _port_number(_only_container(api), port["targetPort"]) == 8000
    pod_labels = api["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


# --- Worker ------------------------------------------------------------------------------------


def test_worker_grace_period_outlasts_its_drain(worker: Manifest) -> None:
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > WORKER_DRAIN_S


def test_worker_runs_python_m_worker_named_after_its_pod(worker: Manifest) -> None:
    container = _only_container(worker)
    assert container["command"] == ["python", "-m", "worker"]
    worker_id = _env(container)["WORKER_ID"]
    assert worker_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_worker_exposes_the_metrics_port_it_is_configured_with(
    worker: Manifest, config: dict[str, str]
) -> None:
    container = _only_container(worker)
    assert _port_number(container, "metrics") == int(config["WORKER_METRICS_PORT"]) == 9100
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == config["WORKER_METRICS_PORT"]


def test_worker_replicas_are_left_to_the_autoscaler(worker: Manifest) -> None:
    assert "replicas" not in worker["spec"]


def test_migration_job_runs_shared_migrate_once(
    manifests: list[tuple[Path, Manifest]],
) -> None:
    job = _find(manifests, "Job", "ticketing-migrate")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "shared.migrate"]
    assert "DATABASE_URL" in _env(container)


# --- Autoscaling -------------------------------------------------------------------------------


def test_scaled_object_scales_the_worker_deployment_within_the_partitions(
    scaled_object: Manifest, worker: Manifest, config: dict[str, str]
) -> None:
    spec = scaled_object["spec"]
    assert spec["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert spec["minReplicaCount"] == 1
    assert 1 <= spec["maxReplicaCount"] <= int(config["PARTITIONS"])


def test_scaled_object_sums_queue_length_over_the_partition_queues_by_regex(
    scaled_object: Manifest,
) -> None:
    (trigger,) = scaled_object["spec"]["triggers"]
    metadata = trigger["metadata"]
    assert trigger["type"] == "rabbitmq"
    assert metadata["protocol"] == "http"  # KEDA's regex lookup needs the management API
    assert metadata["useRegex"] == "true"
    assert metadata["operation"] == "sum"
    assert metadata["mode"] == "QueueLength"
    assert int(metadata["value"]) > 0


def test_scaled_object_queue_regex_matches_exactly_this_namespaces_partition_queues(
    scaled_object: Manifest, config: dict[str, str]
) -> None:
    pattern = re.compile(scaled_object["spec"]["triggers"][0]["metadata"]["queueName"])
    ours = Topology(config["BROKER_NAMESPACE"], int(config["PARTITIONS"]), 1, 1)
    other = Topology("other", int(config["PARTITIONS"]), 1, 1)
    for partition in range(ours.partitions):
        assert pattern.search(ours.queue(partition)), ours.queue(partition)
        assert not pattern.search(other.queue(partition))
    assert not pattern.search(ours.dead_letter_queue)
    assert not pattern.search(ours.dead_letter_record_queue)
    assert not pattern.search(f"x{ours.queue(0)}")


def test_trigger_authentication_reads_a_key_the_secret_example_defines(
    manifests: list[tuple[Path, Manifest]], scaled_object: Manifest
) -> None:
    auth_name = scaled_object["spec"]["triggers"][0]["authenticationRef"]["name"]
    auth = _find(manifests, "TriggerAuthentication", auth_name)
    secret = _find(manifests, "Secret", "ticketing-secrets")
    (target,) = auth["spec"]["secretTargetRef"]
    assert target["parameter"] == "host"
    assert target["name"] == secret["metadata"]["name"]
    assert secret["stringData"][target["key"]].startswith("http://")


# --- Environment variables ---------------------------------------------------------------------


def test_every_env_var_in_the_manifests_is_a_setting(
    manifests: list[tuple[Path, Manifest]], config: dict[str, str]
) -> None:
    names = set(config)
    for _, pod in _pod_specs(manifests):
        for container in pod["containers"]:
            names |= set(_env(container))
    unknown = names - SETTINGS_ENV_VARS
    assert not unknown, f"not fields of shared.settings.Settings: {sorted(unknown)}"


def test_every_configmap_value_is_accepted_by_the_settings(config: dict[str, str]) -> None:
    Settings.model_validate({key.lower(): value for key, value in config.items()})


def test_every_secret_reference_names_a_key_of_the_secret_example(
    manifests: list[tuple[Path, Manifest]],
) -> None:
    secret = _find(manifests, "Secret", "ticketing-secrets")
    for owner, pod in _pod_specs(manifests):
        for container in pod["containers"]:
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == secret["metadata"]["name"], owner
                    assert ref["key"] in secret["stringData"], (owner, ref["key"])


def test_pods_get_no_service_link_env_vars(manifests: list[tuple[Path, Manifest]]) -> None:
    # A Service named e.g. "api" would inject API_PORT=tcp://…, which the settings would read.
    for owner, pod in _pod_specs(manifests):
        assert pod.get("enableServiceLinks") is False, owner


# --- docker compose ----------------------------------------------------------------------------


def test_compose_runs_postgres_rabbitmq_migrate_api_and_worker(compose: Manifest) -> None:
    assert {"postgres", "rabbitmq", "migrate", "api", "worker"} <= compose["services"].keys()


def test_compose_worker_can_be_scaled(compose: Manifest) -> None:
    worker = compose["services"]["worker"]
    assert "WORKER_ID" not in worker.get("environment", {})
    assert "container_name" not in worker


def test_compose_api_starts_after_the_migration_completed(compose: Manifest) -> None:
    depends_on = compose["services"]["api"]["depends_on"]
    assert depends_on["migrate"]["condition"] == "service_completed_successfully"


def test_compose_env_vars_are_settings(compose: Manifest) -> None:
    for name, service in compose["services"].items():
        if str(service.get("image", "")).startswith(("postgres:", "rabbitmq:")):
            continue
        unknown = set(service.get("environment", {})) - SETTINGS_ENV_VARS
        assert not unknown, (name, sorted(unknown))


def test_compose_cluster_profile_points_the_services_at_three_rabbitmq_nodes(
    compose: Manifest,
) -> None:
    services = compose["services"]
    nodes = [f"rabbitmq-{i}" for i in (1, 2, 3)]
    for node in nodes:
        assert services[node]["profiles"] == ["cluster"]
        assert services[node]["hostname"] == node
    for name in ("migrate-cluster", "api-cluster", "worker-cluster"):
        service = services[name]
        assert service["profiles"] == ["cluster"]
        urls = service["environment"]["RABBITMQ_URL"].split(",")
        assert [urlsplit(url).hostname for url in urls] == nodes
        # Its own database: the single-node stack's workers lease the same partitions.
        assert service["environment"]["DATABASE_URL"].endswith("/ticketing_cluster")
    # The default stack is untouched by the profile.
    assert "profiles" not in services["api"]
    assert "rabbitmq-1" not in services["api"]["environment"]["RABBITMQ_URL"]
