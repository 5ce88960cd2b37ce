"""Helpers of tests/test_k8s.py: render the chart and the kustomize overlays, read pods out of
the objects, resolve a container's environment the way the kubelet does, parse its command line
with the real `pdserve` parser, and evaluate NetworkPolicies.

No cluster: Helm's Go SDK (helm-python-sdk) renders the chart, `kubectl kustomize` the overlays.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "k8s" / "helm" / "pdserve"
KUSTOMIZE = ROOT / "k8s" / "kustomize"
DOCKER = ROOT / "k8s" / "docker"
RELEASE = "pdserve"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
PDSERVE_ROLES = ("router", "prefill", "decode")
POD_IP = "10.1.2.3"  # what the downward API would give status.podIP

# ---- rendering ---------------------------------------------------------------------------------


def render_chart(values: dict[str, Any] | None = None, chart: Path = CHART) -> list[dict[str, Any]]:
    """Every object the chart renders for `values` (release `pdserve`, namespace `default`)."""
    with helm_python.Chart.load(chart) as loaded:
        rendered = loaded.render(values or {}, name=RELEASE, namespace="default")
    return [obj for path in sorted(rendered) if path.endswith(".yaml") for obj in yaml.safe_load_all(rendered[path]) if obj]


def values_file(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / name).read_text())


def render_kustomize(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(KUSTOMIZE / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [obj for obj in yaml.safe_load_all(out.stdout) if obj]


# ---- reading objects ---------------------------------------------------------------------------


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def component(obj: dict[str, Any]) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def workload(objects: list[dict[str, Any]], role: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] in WORKLOAD_KINDS and component(o) == role]
    return found


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    return obj["spec"]["template"]["metadata"]["labels"]


def containers(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container of every workload, init containers too."""
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            spec = pod_spec(obj)
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                yield obj, c


def container_port(container: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container.get("ports", []) if p["name"] == name]
    return port


def gpus(container: dict[str, Any]) -> tuple[int, int]:
    """nvidia.com/gpu (requests, limits); 0 where absent."""
    res = container["resources"]
    return int(res.get("requests", {}).get("nvidia.com/gpu", 0)), int(res.get("limits", {}).get("nvidia.com/gpu", 0))


# ---- environment and command line --------------------------------------------------------------

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def secret_value(objects: list[dict[str, Any]], name: str, key: str) -> str:
    """A Secret's value as the kubelet hands it over: decoded from the rendered Secret, or
    `secret:NAME/KEY` for one the manifests expect to exist already."""
    for secret in of_kind(objects, "Secret"):
        if secret["metadata"]["name"] == name:
            assert key in secret.get("data", {}), f"Secret {name} has no key {key!r}"
            return base64.b64decode(secret["data"][key]).decode()
    return f"secret:{name}/{key}"


def container_env(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom first, env over it.
    Downward-API status.podIP becomes POD_IP; a Secret's value comes from secret_value."""
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in of_kind(objects, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in config_maps, f"envFrom names ConfigMap {name!r}, which is not rendered"
        env.update(config_maps[name])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
        elif "fieldRef" in var.get("valueFrom", {}):
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", var
            env[var["name"]] = POD_IP
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secret_value(objects, ref["name"], ref["key"])
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values ($$ is a literal $)."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        assert m.group(1) in env, f"$({m.group(1)}) is not in the container's environment: left unexpanded"
        return env[m.group(1)]

    return _VAR_REF.sub(sub, text)


def secret_volumes(obj: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """mountPath -> (Secret name, readOnly) of every Secret volume the container mounts."""
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod_spec(obj)["volumes"] if "secret" in v}
    return {m["mountPath"]: (secrets[m["name"]], bool(m.get("readOnly")))
            for m in container.get("volumeMounts", []) if m["name"] in secrets}


def command_line(container: dict[str, Any], objects: list[dict[str, Any]]) -> list[str]:
    env = container_env(container, objects)
    return [expand(word, env) for word in [*container.get("command", []), *container.get("args", [])]]


def cli_parser() -> argparse.ArgumentParser:
    """The real `pdserve` parser."""
    from services.cli.main import build_parser

    return build_parser()


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """argv without the program name, parsed by the pdserve CLI; argparse's complaint on failure."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return cli_parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"pdserve rejects {argv}:\n{err.getvalue()}") from None


# ---- NetworkPolicy -----------------------------------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector against a label set."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_admits(peer: dict[str, Any], labels: dict[str, str] | None) -> bool:
    # labels None: an address outside the cluster's pods (an external Redis).
    if "ipBlock" in peer:
        return labels is None
    if "namespaceSelector" in peer and peer["namespaceSelector"] != {}:
        return False  # another namespace; the pods under test all live in the release's
    return labels is not None and selects(peer.get("podSelector", {}), labels)


def _rule_admits(rule: dict[str, Any], peers_key: str, labels: dict[str, str] | None, port: int) -> bool:
    ports = rule.get("ports")
    if ports and not any(p.get("port") in (None, port) or p["port"] <= port <= p.get("endPort", 0) for p in ports):
        return False
    peers = rule.get(peers_key)
    return not peers or any(_peer_admits(p, labels) for p in peers)


def allows(policies: list[dict[str, Any]], src: dict[str, str] | None, dst: dict[str, str] | None, port: int) -> bool:
    """Whether pod `src` may open a TCP connection to pod `dst` on `port` (None: not a pod)."""
    def direction(pod: dict[str, str] | None, kind: str, rules_key: str, peers_key: str, other: Any) -> bool:
        if pod is None:
            return True
        chosen = [p for p in policies if kind in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], pod)]
        return not chosen or any(_rule_admits(r, peers_key, other, port)
                                 for p in chosen for r in p["spec"].get(rules_key) or [])

    return direction(src, "Egress", "egress", "to", dst) and direction(dst, "Ingress", "ingress", "from", src)
