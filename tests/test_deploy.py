"""Deployment: the compose files against the Compose specification, `ffpipe compose`, the Dockerfiles, and
every service of docker-compose.yml run as a local process on real MNIST."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ffpipe.cli import app
from ffpipe.compose import compose_file, dump
from ffpipe.topology import free_ports

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _compose_cli(*args) -> str:
    result = runner.invoke(app, ["compose", *args, "--out", "-"])
    assert result.exit_code == 0, result.output
    return result.stdout


def _validate(path: Path) -> subprocess.CompletedProcess:
    """check-jsonschema with the compose-spec.json it ships (the Compose specification's own schema)."""
    cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _merge(base, override):
    """Compose's merge of an override file: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base[k], v) if k in base else v for k, v in override.items()}}
    return override


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _gpu_merged() -> dict:
    merged = _merge(_load(REPO / "docker-compose.yml"), _load(REPO / "deploy" / "compose.gpu.yml"))
    return {k: v for k, v in merged.items() if k != "x-gpu"}


def test_docker_compose_yml_is_what_ffpipe_compose_writes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["compose", "--layers", "4"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "docker-compose.yml").read_text()
    assert (REPO / "docker-compose.yml").read_text() == text
    assert yaml.safe_load(text) == compose_file(4)


def test_gpu_override_is_what_ffpipe_compose_writes_with_gpus():
    assert _gpu_merged() == compose_file(4, gpus=["0", "1", "2", "3"])


def test_compose_files_follow_the_compose_specification(tmp_path):
    files = {"docker-compose.yml": REPO / "docker-compose.yml", "compose.gpu.yml": REPO / "deploy" / "compose.gpu.yml"}
    files["merged"] = tmp_path / "merged.yml"
    files["merged"].write_text(yaml.safe_dump(_gpu_merged()))
    for name, args in {"layers2": ["--layers", "2"], "layers6-gpus": ["--layers", "6", "--gpus", "0,1,2"],
                       "hinton-digits": ["--layers", "3", "--preset", "hinton", "--dataset", "digits", "--epochs", "2"]}.items():
        files[name] = tmp_path / f"{name}.yml"
        files[name].write_text(_compose_cli(*args))
    for name, path in files.items():
        result = _validate(path)
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
    # the validator is real: a service with a misspelled key, and an image that is no string, are rejected
    broken = compose_file(2)
    broken["services"]["layer0"]["restart_policy"] = "always"
    broken["services"]["sink"]["image"] = ["ffpipe:cpu"]
    (tmp_path / "broken.yml").write_text(dump(broken))
    result = _validate(tmp_path / "broken.yml")
    assert result.returncode == 1 and "'restart_policy' was unexpected" in result.stdout and "services.sink.image" in result.stdout, result.stdout


def test_compose_file_for_any_number_of_layers():
    doc = compose_file(6, gpus=["0", "1"], epochs=3)
    services = doc["services"]
    assert list(services) == ["source", *(f"layer{i}" for i in range(6)), "sink"]
    env = {name: svc["environment"] for name, svc in services.items()}
    assert env["layer5"]["FFPIPE_LAYER_ADDRS"] == ",".join(f"layer{i}:{5551 + i}" for i in range(6))
    assert [env[f"layer{i}"]["FFPIPE_INDEX"] for i in range(6)] == [str(i) for i in range(6)]
    assert {e["FFPIPE_ROLE"] for e in env.values()} == {"source", "layer", "sink"}
    # downstream starts first, and the source stops first
    assert [services[n].get("depends_on") for n in services] == [[f"layer{i}"] for i in range(6)] + [["sink"], None]
    gpus = [services[f"layer{i}"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for i in range(6)]
    assert gpus == [["0"], ["1"]] * 3 and all(env[f"layer{i}"]["FFPIPE_DEVICE"] == "cuda" for i in range(6))
    assert "deploy" not in services["source"] and "FFPIPE_DEVICE" not in env["sink"]
    assert "${FFPIPE_EPOCHS:-3}" in doc["x-ffpipe"]["command"]
    assert "${FFPIPE_EPOCHS:-5}" in compose_file(2)["x-ffpipe"]["command"]  # the quick preset's epochs on MNIST


@pytest.mark.parametrize("args, message", [
    (["--layers", "0"], "--layers must be 1 to 256"),
    (["--layers", "2", "--preset", "seed"], "in-process"),
    (["--layers", "2", "--preset", "nope"], "unknown preset"),
    (["--layers", "2", "--dataset", "auto"], "name the dataset"),
    (["--layers", "2", "--gpus", "a,b"], "GPU ids"),
])
def test_compose_errors_are_one_line(args, message):
    result = runner.invoke(app, ["compose", *args, "--out", "-"])
    assert result.exit_code == 1 and message in result.output and result.output.count("\n") == 1, result.output


def _instructions(path: Path) -> list[tuple[str, str]]:
    lines = [line.strip() for line in path.read_text().replace("\\\n", " ").splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("name, base", [("Dockerfile", "python:3.11-slim"), ("Dockerfile.cuda", "nvidia/cuda:")])
def test_dockerfiles_install_the_repo_and_run_ffpipe_as_a_user(name, base):
    steps = _instructions(REPO / "deploy" / name)
    kinds = [k for k, _ in steps]
    arg = {k: v for k, v in reversed(steps)}  # the first of each kind
    assert arg["FROM"].startswith(base)
    runs = [v for k, v in steps if k == "RUN"]
    assert any("--index-url" in r and "torch==2.14.1" in r and "torchvision==0.29.1" in r for r in runs)
    assert "https://download.pytorch.org/whl/c" in (REPO / "deploy" / name).read_text()  # the cpu or a cuda index
    assert all("--no-cache-dir" in r for r in runs if "pip install" in r)
    install = next(i for i, r in enumerate(steps) if r[0] == "RUN" and "pip install --no-cache-dir ." in r[1])
    assert any(k == "COPY" and "ffpipe/" in v for k, v in steps[:install]) and arg["WORKDIR"] == "/app"
    user = [v for k, v in steps if k == "USER"]
    assert user and user[-1] not in ("root", "0") and kinds.index("USER") > install
    assert json.loads(arg["ENTRYPOINT"]) == ["ffpipe"]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"runs/", "results/", ".venv", ".git", "data/", "**/__pycache__"} <= set(ignored)


# ---- every service of docker-compose.yml as a local process

def _interpolate(text: str, variables: dict) -> str:
    """Compose's ${NAME:-default}, the only substitution the file uses."""
    done = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: variables.get(m[1], m[2]), text)
    assert "$" not in done, text
    return done


class Services:
    """The services of a compose file started as local processes: service names are 127.0.0.1, every port
    a free local one, the volumes' container paths the given host folders."""

    def __init__(self, doc: dict, mounts: dict, variables: dict, logs: Path):
        services = doc["services"]
        ports = sorted({int(p) for svc in services.values() for v in svc["environment"].values()
                        for p in re.findall(rf"\b(?:{'|'.join(services)}):(\d+)", str(v))})
        self.ports = dict(zip(ports, free_ports(len(ports)), strict=True))
        self.mounts, self.variables, self.logs = mounts, variables, logs
        self.env = {name: self._environment(svc) for name, svc in services.items()}
        self.commands = {name: [_interpolate(a, variables) for a in svc["command"]] for name, svc in services.items()}
        self.health = {name: svc["healthcheck"]["test"] for name, svc in services.items()}
        self.procs: dict[str, subprocess.Popen] = {}

    def _environment(self, svc: dict) -> dict:
        env = {}
        for key, value in svc["environment"].items():
            value = re.sub(r"\b[a-z]\w*:(\d+)\b", lambda m: f"127.0.0.1:{self.ports[int(m[1])]}", str(value))
            for inside, outside in self.mounts.items():
                if value == inside or value.startswith(inside + "/"):
                    value = str(outside) + value[len(inside):]
            env[key] = value
        return env

    def start(self) -> None:
        for name, command in self.commands.items():
            log = open(self.logs / f"{name}.log", "w")
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "ffpipe", *command], env={**os.environ, **self.env[name]},
                                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()

    def healthy(self, name: str) -> bool:
        kind, *test = self.health[name]
        assert kind == "CMD" and test[0] == "python", test
        return subprocess.run([sys.executable, *test[1:]], env={**os.environ, **self.env[name]}, capture_output=True,
                              timeout=30).returncode == 0

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()[-3000:]

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def services_of():
    started = []

    def make(*args) -> Services:
        started.append(Services(*args))
        return started[-1]

    yield make
    for services in started:
        services.kill()


@pytest.mark.slow
@pytest.mark.realdata
def test_compose_services_train_mnist_end_to_end(shared_data, tmp_path, services_of):
    doc = _load(REPO / "docker-compose.yml")
    volumes = {v.split(":")[1]: v.split(":")[0] for v in doc["x-ffpipe"]["volumes"]}
    assert volumes == {"/data": "./data", "/runs": "./runs"}
    services = services_of(doc, {"/data": shared_data, "/runs": tmp_path / "runs"}, {"FFPIPE_EPOCHS": "1"}, tmp_path)
    assert not set(services.ports.values()) & set(range(5549, 5555))
    services.start()
    deadline = time.monotonic() + 240
    unchecked = set(services.procs)
    while unchecked:  # every health check passes while its role runs (it binds, then serves until stop)
        for name in sorted(unchecked):
            assert services.procs[name].poll() is None, f"{name} exited before its health check passed:\n{services.log(name)}"
            if services.healthy(name):
                unchecked.discard(name)
        assert time.monotonic() < deadline, f"health checks still failing: {sorted(unchecked)}"
        time.sleep(0.5)  # polling a health check, as docker does every interval
    for name, proc in services.procs.items():
        try:
            rc = proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} still running after the deadline:\n{services.log(name)}")
        assert rc == 0, f"{name} exited {rc}:\n{services.log(name)}"
    out = tmp_path / "runs" / "compose"
    s = json.loads((out / "summary.json").read_text())
    a = s["accounting"]
    assert s["dataset"] == "mnist" and s["layers"] == [500] * 4 and s["epochs"] == 1
    assert a["complete"] and a["sent_train"] == a["received_train"] == 600 and a["applied"] == [600] * 4  # 60,000 / 100
    assert all(n == 0 for n in a["rejected"].values()), a["rejected"]
    assert s["test_accuracy"] > 0.80, s["test_accuracy"]
    assert sorted(p.name for p in out.glob("layer*.pt")) == [f"layer{i}.pt" for i in range(4)]


@pytest.mark.slow
def test_compose_stop_then_up_resumes_the_run(tmp_path, services_of):
    # the services of `ffpipe compose` at a tiny size; `docker compose stop` sends SIGTERM to the source first
    doc = yaml.safe_load(dump(compose_file(2, dataset="digits", width=32, epochs=20)))
    runs = tmp_path / "runs"

    def up(tag: str, stop: bool = False) -> dict:
        (tmp_path / tag).mkdir()
        services = services_of(doc, {"/data": tmp_path / "data", "/runs": runs}, {}, tmp_path / tag)
        services.start()
        metrics = runs / "compose" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while stop and not (metrics.is_file() and '"train"' in metrics.read_text()):  # some batches went through
            assert services.procs["sink"].poll() is None, services.log("sink")
            assert time.monotonic() < deadline, f"no train metrics within 120 s:\n{services.log('sink')}"
            time.sleep(0.1)
        if stop:
            services.procs["source"].send_signal(signal.SIGTERM)
        for name, proc in services.procs.items():
            assert proc.wait(120) == 0, f"{name}:\n{services.log(name)}"
        return json.loads((runs / "compose" / "summary.json").read_text())

    total = 20 * 29  # 1,437 digits in batches of 50
    stopped = up("stopped", stop=True)
    done = stopped["accounting"]["applied"][0]
    assert stopped["interrupted"] and 0 < done < total and stopped["accounting"]["applied"] == [done, done]
    resumed = up("resumed")
    a = resumed["accounting"]
    assert not resumed["interrupted"] and a["complete"] and a["sent_train"] == total and a["applied"] == [total, total]
    assert a["sent_train_now"] == total - done  # the resumed source sent only what the layers had not applied
    # no launcher assembled checkpoint.pt: ffpipe eval does, once, and scores the model as the sink did
    out = runs / "compose"
    assert not (out / "checkpoint.pt").exists()
    scored = subprocess.run([sys.executable, "-m", "ffpipe", "eval", "--checkpoint", str(out), "--data-dir", str(tmp_path / "data")],
                            capture_output=True, text=True, timeout=120)
    assert scored.returncode == 0 and "assembled" in scored.stderr, scored.stderr
    assert json.loads(scored.stdout.strip().splitlines()[-1])["accuracy"] == pytest.approx(resumed["test_accuracy"])
    assert (out / "checkpoint.pt").is_file()
