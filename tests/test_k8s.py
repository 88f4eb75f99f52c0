"""The Kubernetes manifests under deploy/k8s: schema-checked with kubernetes-validate (the API's own OpenAPI
schemas, strict: unknown fields are errors), and wired together: names, ports, the completion index."""

import subprocess
import sys
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
MANIFESTS = ["configmap.yaml", "service.yaml", "storage.yaml", "layers-job.yaml", "sink-job.yaml", "source-job.yaml"]


def _validate(*paths) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _docs(name: str) -> list[dict]:
    return list(yaml.safe_load_all((K8S / name).read_text()))


def test_manifests_pass_the_kubernetes_schema(tmp_path):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(MANIFESTS)
    result = _validate(*(K8S / m for m in MANIFESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 7, result.stdout  # storage.yaml holds two claims
    # the validator is real: a wrong type and (strict) a misspelled field are each rejected
    wrong_type, misspelled = _docs("layers-job.yaml")[0], _docs("layers-job.yaml")[0]
    wrong_type["spec"]["template"]["spec"]["containers"][0]["args"] = "run --role layer"
    misspelled["spec"]["completionsMode"] = misspelled["spec"].pop("completionMode")
    for name, doc, word in (("type", wrong_type, "args"), ("field", misspelled, "completionsMode")):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(doc))
        result = _validate(tmp_path / f"{name}.yaml")
        assert result.returncode != 0 and word in result.stdout, result.stdout


def test_roles_find_each_other_through_the_headless_service():
    config = _docs("configmap.yaml")[0]["data"]
    (service,) = _docs("service.yaml")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    ports = {p["port"] for p in service["spec"]["ports"]}
    (layers,) = _docs("layers-job.yaml")
    n = layers["spec"]["completions"]
    assert layers["spec"]["completionMode"] == "Indexed" and layers["spec"]["parallelism"] == n
    addrs = config["FFPIPE_LAYER_ADDRS"].split(",")
    assert [a.rpartition(":")[0] for a in addrs] == [f"{layers['metadata']['name']}-{i}.ffpipe" for i in range(n)]
    pod = layers["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["FFPIPE_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    for role, key in (("source", "FFPIPE_SOURCE_ADDR"), ("sink", "FFPIPE_SINK_ADDR")):
        (job,) = _docs(f"{role}-job.yaml")
        spec = job["spec"]["template"]["spec"]
        assert f"{spec['hostname']}.{spec['subdomain']}" == config[key].rpartition(":")[0]
        assert spec["containers"][0]["args"][:3] == ["run", "--role", role]
    for a in [*addrs, config["FFPIPE_SOURCE_ADDR"], config["FFPIPE_SINK_ADDR"]]:
        assert int(a.rpartition(":")[2]) in ports
    # a rule across fields that the schema cannot check: the API refuses backoffLimitPerIndex with another policy
    assert "backoffLimitPerIndex" not in layers["spec"] or pod["restartPolicy"] == "Never"
    for name in ("layers-job.yaml", "sink-job.yaml", "source-job.yaml"):  # every role: the same training flags, resumable, keyed
        (job,) = _docs(name)
        spec = job["spec"]["template"]["spec"]
        args = spec["containers"][0]["args"]
        assert args[args.index("--layers") + 1] == ",".join(["500"] * n) and "--resume-role" in args
        assert spec["securityContext"]["runAsNonRoot"] and config["FFPIPE_KEYS"] == "/keys"
        assert any(v.get("secret", {}).get("secretName") == "ffpipe-keys" for v in spec["volumes"])
