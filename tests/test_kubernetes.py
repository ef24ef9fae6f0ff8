"""The Kubernetes manifests (deploy/kubernetes/) against the service they deploy: every probe path is
answered 200 by a real `python -m serve` process started with the Deployment's own command line and key
file format, readiness means "bundles loaded", SIGTERM drains an in-flight request within the grace
period, and the ports, uid, entrypoint, HPA target, labels and kustomization agree with serve/Dockerfile
and with each other. Not a schema check (kubernetes-validate or kubeconform do that; see
docs/kubernetes.md).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from test_serve_support import REPO, Server, call, tiny_bundle

DEPLOY = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "serve" / "Dockerfile"
KEY = "probe-test-key-0123456789abcdef"


# --- reading the manifests and the Dockerfile -----------------------------------------------------------


def load_manifests() -> dict[str, list[dict]]:
    """file name -> its YAML documents (every *.yaml and *.yml in the folder, kustomization included)."""
    out = {}
    for path in sorted([*DEPLOY.glob("*.yaml"), *DEPLOY.glob("*.yml")]):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path.name}: no YAML document"
        out[path.name] = docs
    return out


def objects() -> list[dict]:
    return [d for name, docs in load_manifests().items() if name != "kustomization.yaml" for d in docs]


def one(kind: str) -> dict:
    found = [o for o in objects() if o.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in {DEPLOY}, found {len(found)}"
    return found[0]


def pod_spec() -> dict:
    return one("Deployment")["spec"]["template"]["spec"]


def container() -> dict:
    (c,) = pod_spec()["containers"]
    return c


def dockerfile() -> dict[str, str]:
    """Last value of each instruction (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out[word.upper()] = rest.strip()
    return out


def exec_form(value: str) -> list[str]:
    assert value.startswith("["), f"expected the exec (JSON array) form, got {value!r}"
    return json.loads(value)


def container_port(port: int | str) -> int:
    """A probe's or Service's port (number or container port name) as the container port number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container()["ports"] if "name" in p}
    assert port in named, f"port name {port!r} is not a container port name ({sorted(named)})"
    return named[port]


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]  # argparse: the last occurrence wins


def probes() -> dict[str, dict]:
    c = container()
    found = {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c}
    assert {"readinessProbe", "livenessProbe"} <= found.keys(), f"probes: {sorted(found)}"
    return found


QUANTITY = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(q: str | int | float) -> float:
    m = re.fullmatch(r"([0-9.]+)(m|k|M|G|Ki|Mi|Gi)?", str(q))
    assert m, f"unsupported quantity {q!r}"
    return float(m.group(1)) * QUANTITY[m.group(2) or ""]


# --- the real service as the Deployment starts it --------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    """What the Secret holds: sha256 digests only (docs/kubernetes.md), one user key."""
    path = tmp_path_factory.mktemp("secret") / "keys.txt"
    path.write_text(f"# prometheus\nsha256:{hashlib.sha256(KEY.encode()).hexdigest()} user\n")
    return path


def manifest_args() -> list[str]:
    """The Deployment's command + args after `python -m serve`, without --port (the test picks a free
    one; that --port equals the container port is checked separately)."""
    c = container()
    argv = [*c["command"], *c.get("args", [])]
    assert argv[:3] == ["python", "-m", "serve"], argv
    rest, out = argv[3:], []
    while rest:
        a = rest.pop(0)
        if a == "--port":
            rest.pop(0)
        elif not a.startswith("--port="):
            out.append(a)
    return out


def start(models: Path, key_file: Path) -> Server:
    """`python -m serve` with the manifest's arguments (so off loopback: --host 0.0.0.0) and its key file
    variable pointing at a file in the Secret's format."""
    env = {e["name"]: e["value"] for e in container().get("env", []) if "value" in e}
    assert "MASML_SERVE_API_KEYS_FILE" in env, "the Deployment must give the service its key file"
    env["MASML_SERVE_API_KEYS_FILE"] = str(key_file)
    return Server(models, *manifest_args(), env=env)


@pytest.fixture(scope="module")
def server(bundle, key_file):
    s = start(bundle[1], key_file)
    yield s
    s.stop()


def test_every_probe_path_answers_200_without_credentials(server):
    """What the kubelet does: GET each probe's path on its port, no Authorization header."""
    assert "0.0.0.0" in server.stderr(), "the service did not bind the manifest's --host"
    for kind, probe in probes().items():
        get = probe.get("httpGet")
        assert get, f"{kind}: expected an httpGet probe on the service's health endpoints"
        assert container_port(get["port"]) == container()["ports"][0]["containerPort"]
        headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
        status, _, body = call("GET", server.url(get["path"]), headers=headers)
        assert status == 200, f"{kind} GET {get['path']} -> {status}: {body}"


def test_readiness_is_bundles_loaded_and_liveness_is_not(bundle, key_file, tmp_path):
    """A pod whose image holds no loadable bundle is kept out of the Service (readiness 503) but not
    restarted in a loop (liveness and startup 200)."""
    empty = tmp_path / "models"
    empty.mkdir()
    s = start(empty, key_file)
    try:
        p = probes()
        assert call("GET", s.url(p["readinessProbe"]["httpGet"]["path"]))[0] == 503
        assert call("GET", s.url(p["livenessProbe"]["httpGet"]["path"]))[0] == 200
        if "startupProbe" in p:
            assert call("GET", s.url(p["startupProbe"]["httpGet"]["path"]))[0] == 200
    finally:
        s.stop()


def test_secret_key_file_format_admits_its_key(server):
    """The digest-only key file works: /metrics (what Prometheus scrapes) needs the key, probes do not."""
    assert call("GET", server.url("/metrics"))[0] == 401
    status, _, text = call("GET", server.url("/metrics"), headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200 and "masml_requests_total" in text


def _connect_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_sigterm_drains_an_in_flight_request_within_the_grace_period(bundle, key_file):
    """The kubelet's shutdown after the preStop hook: SIGTERM stops new connections, the request that
    is in flight still gets its answer, and the process is gone before the grace period ends."""
    spec, c = pod_spec(), container()
    grace = spec.get("terminationGracePeriodSeconds", 30)
    pre_stop = c["lifecycle"]["preStop"]
    sleep = pre_stop["sleep"]["seconds"] if "sleep" in pre_stop else int(pre_stop["exec"]["command"][-1])
    assert 0 < sleep < grace, f"preStop sleep {sleep}s must leave time to drain within {grace}s"

    s = start(bundle[1], key_file)
    body = json.dumps({"patients": [{"age_years": 9, "sex": "F", "trigger": "sjia", "ferritin": 8000}]})
    raw = body.encode()
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=20)
    try:
        conn.putrequest("POST", "/v1/models/onset/predict")
        for k, v in {
            "Authorization": f"Bearer {KEY}",
            "Content-Type": "application/json",
            "Content-Length": str(len(raw)),
        }.items():
            conn.putheader(k, v)
        conn.endheaders(raw[:10])  # the request is in flight: headers and part of the body sent
        time.sleep(0.2)
        t0 = time.monotonic()
        s.proc.terminate()
        deadline = t0 + 10
        while not _connect_refused(s.port):
            assert time.monotonic() < deadline, "still accepting connections 10 s after SIGTERM"
            time.sleep(0.05)
        conn.send(raw[10:])
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        assert resp.status == 200, answer
        assert answer["predictions"][0]["risk"] is not None
        s.proc.wait(timeout=grace - sleep)
        took = time.monotonic() - t0
        log = s.stderr()
    finally:
        conn.close()
        if s.proc.poll() is None:
            s.proc.kill()
        s.stop()
    assert took < grace - sleep, f"exit took {took:.1f}s after SIGTERM, over {grace - sleep}s"
    assert "Shutting down" in log and "Traceback" not in log, log[-2000:]


# --- the manifests among themselves and against serve/Dockerfile -----------------------------------------


def test_manifests_parse_with_the_expected_kinds():
    kinds = {(o.get("apiVersion"), o.get("kind")) for o in objects()}
    for o in objects():
        assert o.get("metadata", {}).get("name"), f"object without metadata.name: {o.get('kind')}"
    assert {
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ("policy/v1", "PodDisruptionBudget"),
    } <= kinds, kinds


def test_kustomization_lists_every_manifest_file():
    manifests = load_manifests()
    (kust,) = manifests.pop("kustomization.yaml")
    listed = kust.get("resources", [])
    assert len(listed) == len(set(listed)), f"listed twice: {listed}"
    assert set(listed) == set(manifests), (
        f"in the folder, not listed: {sorted(set(manifests) - set(listed))}; "
        f"listed, not in the folder: {sorted(set(listed) - set(manifests))}"
    )
    image = container()["image"].split(":")[0]
    assert image in {i["name"] for i in kust.get("images", [])}, f"kustomization images never set {image}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_builds_the_objects_with_the_image_tag():
    """What `kubectl apply -k` sends: kustomize (built into kubectl) accepts the folder, emits the four
    objects, and rewrites the Deployment's image to the kustomization's name and tag."""
    r = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr
    built = [d for d in yaml.safe_load_all(r.stdout) if d]

    def names(objs: list[dict]) -> list[tuple[str, str]]:
        return sorted((o["kind"], o["metadata"]["name"]) for o in objs)

    assert names(built) == names(objects())
    (kust,) = load_manifests()["kustomization.yaml"]
    (img,) = [i for i in kust["images"] if i["name"] == container()["image"].split(":")[0]]
    (dep,) = [o for o in built if o["kind"] == "Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == f"{img.get('newName', img['name'])}:{img['newTag']}"


def test_container_port_is_the_dockerfile_expose_and_the_service_target():
    (port,) = [p["containerPort"] for p in container()["ports"]]
    assert port == int(dockerfile()["EXPOSE"].split("/")[0])
    svc = one("Service")
    (sp,) = svc["spec"]["ports"]
    assert container_port(sp["targetPort"]) == port and sp["port"] == 80
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_command_is_the_dockerfile_entrypoint_on_the_container_port():
    c = container()
    entry = exec_form(dockerfile()["ENTRYPOINT"])
    assert c["command"] == entry, f"Deployment command {c['command']} differs from ENTRYPOINT {entry}"
    argv = [*c["command"], *c.get("args", [])]
    assert int(option(argv, "--port")) == c["ports"][0]["containerPort"]
    assert option(argv, "--host") == "0.0.0.0", "the Service's traffic arrives on the pod IP"
    assert int(option(argv, "--workers")) == 1, "one worker per pod: the HPA scales pods (docs/kubernetes.md)"


def test_labels_select_the_pods():
    dep = one("Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict) -> bool:
        return selector.items() <= labels.items()

    assert selects(dep["spec"]["selector"]["matchLabels"])
    assert selects(one("Service")["spec"]["selector"])
    assert selects(one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"])


def test_hpa_scales_the_deployment_on_cpu():
    hpa, dep = one("HorizontalPodAutoscaler"), one("Deployment")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0
    assert "replicas" not in dep["spec"], "the HPA owns the replica count; `apply` would reset it"


def test_every_container_requests_resources_within_its_limits():
    spec = pod_spec()
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        res = c.get("resources", {})
        requests, limits = res.get("requests", {}), res.get("limits", {})
        assert {"cpu", "memory"} <= requests.keys(), f"{c['name']}: requests {requests}"
        assert "memory" in limits, f"{c['name']}: no memory limit"
        for k, v in limits.items():
            assert quantity(v) >= quantity(requests.get(k, 0)), f"{c['name']}: {k} limit {v} < request"


def test_security_context_runs_as_the_dockerfile_user():
    found = re.search(r"useradd\b[^&;]*--uid[ =](\d+)", DOCKERFILE.read_text())
    assert found, "no `useradd --uid N` in serve/Dockerfile"
    uid = int(found.group(1))
    assert int(dockerfile()["USER"].split(":")[0]) == uid
    pod, c = pod_spec().get("securityContext", {}), container()["securityContext"]
    for where, ctx in (("pod", pod), ("container", c)):  # wherever set, it is the image's user
        assert ctx.get("runAsUser", uid) == uid, f"{where} runAsUser {ctx['runAsUser']} != Dockerfile {uid}"
        assert ctx.get("runAsNonRoot", True) is True, where
    merged = pod | c  # the container's settings override the pod's
    assert merged["runAsUser"] == uid and merged["runAsNonRoot"] is True
    assert c["readOnlyRootFilesystem"] is True and c["allowPrivilegeEscalation"] is False
    assert c.get("capabilities", {}).get("drop") == ["ALL"]


def test_key_file_comes_from_a_secret_volume():
    c, spec = container(), pod_spec()
    env = {e["name"]: e for e in c["env"]}
    path = Path(env["MASML_SERVE_API_KEYS_FILE"]["value"])
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert str(path.parent) in mounts, f"{path} is not in a mounted volume ({sorted(mounts)})"
    mount = mounts[str(path.parent)]
    assert mount.get("readOnly") is True
    (vol,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    secret = vol.get("secret")
    assert secret, f"volume {vol['name']} is not a Secret"
    items = secret.get("items")
    provided = {i["path"] for i in items} if items else None
    assert provided is None or path.name in provided, f"the Secret does not provide {path.name}"


def test_docs_name_the_apply_command_and_the_secret():
    doc = (REPO / "docs" / "kubernetes.md").read_text()
    assert "kubectl apply -k deploy/kubernetes" in doc
    secret = next(v["secret"]["secretName"] for v in pod_spec()["volumes"] if "secret" in v)
    assert f"create secret generic {secret}" in doc
