"""The Docker Compose deployment of a pipeline: one service per role, each finding the others by service name.

`compose_file` builds the document as plain data, `dump` writes it as YAML with the settings every service
shares under one `x-ffpipe` anchor, and `probe` is the health check each service runs. The repo's
docker-compose.yml is `ffpipe compose --layers 4`.
"""

from __future__ import annotations

import os
import socket

SINK_PORT, SOURCE_PORT, FIRST_LAYER_PORT = 5549, 5550, 5551  # the defaults of `ffpipe run --role`

HEADER = """\
# Written by `ffpipe compose` (ffpipe/compose.py): regenerate it there rather than edit it here.
# One container per pipeline role (source, {layers}, sink); each binds its own port and finds the others by
# service name. Every service gets the same training settings from x-ffpipe, so all build the same config.
#   mkdir -p data runs   # {data}; runs/ must be writable by uid 1000 (the image's user)
#   docker compose up    # FFPIPE_EPOCHS=1 docker compose up for a shorter run
# Results: runs/compose/summary.json (sink) and layer<i>.pt (each layer).
# depends_on chains source -> layer0 -> ... -> sink: they start downstream first and `docker compose stop`
# stops the source first, which sends the in-band stop through the layers (each checkpoints) to the sink.
# Restart: every role runs with --resume-role, so `docker compose up` after a stop continues from the
# checkpoints in runs/compose (the source skips what every layer and the sink hold). A role that fails
# (non-zero exit, or killed) is restarted from its last checkpoint, at most 3 times: on-failure, not always,
# because a role that finished exits 0 and must stay down, and at most 3 so a role whose peer is gone for
# good (it exits 1 after 120 s of silence) does not loop. The source resends what the dead role lost, so
# every batch is still applied exactly once by every layer (README, Reliability). Remove runs/compose to
# train afresh.
"""


DATA_HINTS = {"mnist": "MNIST in data/MNIST/raw/", "fashion-mnist": "Fashion-MNIST in data/FashionMNIST/raw/",
              "cifar10": "CIFAR-10 in data/cifar-10-batches-py/", "fer2013": "FER2013 in data/fer2013/fer2013.csv",
              "digits": "nothing: the digits come with scikit-learn", "synthetic": "nothing: the data is generated"}
MAX_LAYERS = 256  # layer services a file may hold: each is a container with its own port (5551 + i)


def compose_file(layers: int, gpus: list[str] | None = None, preset: str = "quick", dataset: str = "mnist",
                 width: int = 500, epochs: int | None = None) -> dict:
    """The compose document for `layers` layer services of `width` units; with `gpus`, layer i reserves
    GPU gpus[i mod n] and runs the CUDA image. `epochs` defaults to the preset's for the dataset."""
    from ffpipe.config import preset as make

    if not 1 <= layers <= MAX_LAYERS:
        raise ValueError(f"--layers must be 1 to {MAX_LAYERS} (one service and one port per layer); got {layers}")
    if width < 1:
        raise ValueError(f"--width must be >= 1; got {width}")
    if dataset == "auto":  # each container would resolve it alone, and they must agree
        raise ValueError("--dataset auto is resolved per process; name the dataset, e.g. mnist")
    cfg = make(preset, dataset=dataset, layers=(width,) * layers, epochs=epochs)
    if cfg.schedule != "joint":
        raise ValueError(f"the {preset} preset trains layer after layer ({cfg.schedule}), which only runs in-process")
    if gpus is not None and (not gpus or not all(g.isdigit() for g in gpus)):
        raise ValueError(f"--gpus must list GPU ids such as 0,1,2,3; got {','.join(gpus)!r}")

    names = [f"layer{i}" for i in range(layers)]
    env = {
        "FFPIPE_PRESET": preset,
        "FFPIPE_DATASET": dataset,
        "FFPIPE_DATA_DIR": "/data",
        "FFPIPE_OUT": "/runs/compose",
        "FFPIPE_SOURCE_ADDR": f"source:{SOURCE_PORT}",
        "FFPIPE_LAYER_ADDRS": ",".join(f"{n}:{FIRST_LAYER_PORT + i}" for i, n in enumerate(names)),
        "FFPIPE_SINK_ADDR": f"sink:{SINK_PORT}",
        "FFPIPE_BIND_HOST": "0.0.0.0",
        "OMP_NUM_THREADS": "1",  # one torch thread per role, as the launcher gives its children
        "PYTHONUNBUFFERED": "1",
    }
    shared = {
        "image": "ffpipe:cpu",
        "build": {"context": ".", "dockerfile": "deploy/Dockerfile"},
        # the data is mounted read-only, so a missing dataset is an error rather than a download attempt
        "command": ["run", "--layers", ",".join(map(str, cfg.layers)), "--epochs", f"${{FFPIPE_EPOCHS:-{cfg.epochs}}}",
                    "--no-download", "--resume-role"],
        "environment": env,
        "volumes": ["./data:/data:ro", "./runs:/runs"],
        "restart": "on-failure:3",
        "healthcheck": {"test": ["CMD", "python", "-c", "from ffpipe.compose import probe; probe()"],
                        "interval": "10s", "timeout": "5s", "retries": 3, "start_period": "60s"},
    }

    def service(role: str, downstream: str | None, **own_env: str) -> dict:
        svc = {**shared, "environment": {**env, "FFPIPE_ROLE": role, **own_env}}
        if downstream is not None:
            svc["depends_on"] = [downstream]
        return svc

    services = {"source": service("source", names[0])}
    for i, name in enumerate(names):
        services[name] = service("layer", (names[i + 1:] or ["sink"])[0], FFPIPE_INDEX=str(i))
        if gpus is not None:
            services[name].update(gpu_layer(gpus[i % len(gpus)]))
            services[name]["environment"]["FFPIPE_DEVICE"] = "cuda"
    services["sink"] = service("sink", None)
    return {"x-ffpipe": shared, "services": services}


def gpu_layer(gpu: str) -> dict:
    """What a layer service changes to run on one GPU (the container sees it as cuda:0)."""
    return {
        "image": "ffpipe:cuda",
        "build": {"context": ".", "dockerfile": "deploy/Dockerfile.cuda"},
        "deploy": {"resources": {"reservations": {"devices": [{"driver": "nvidia", "device_ids": [gpu], "capabilities": ["gpu"]}]}}},
    }


def dump(doc: dict) -> str:
    """YAML under HEADER; each service merges x-ffpipe (`<<: *ffpipe`) and lists only what it changes."""
    import yaml

    shared, env = doc["x-ffpipe"], doc["x-ffpipe"]["environment"]
    services = {}
    for name, svc in doc["services"].items():
        # a merge can only add keys: every service must have every shared key, and the shared environment
        assert shared.keys() <= svc.keys() and env.keys() <= svc["environment"].keys(), name
        own = {k: v for k, v in svc.items() if k != "environment" and shared.get(k) != v}
        own_env = {k: v for k, v in svc["environment"].items() if env.get(k) != v}
        services[name] = {_MERGE: shared, **own, "environment": {_MERGE: env, **own_env}}
    text = yaml.dump({**doc, "services": services}, Dumper=_yaml_dumper(), sort_keys=False, width=1000)
    layers = sum(1 for name in services if name.startswith("layer"))
    dataset = env["FFPIPE_DATASET"]
    data = DATA_HINTS.get(dataset, f"the {dataset} files in data/ (README, Datasets)")
    return HEADER.format(layers=f"layer0..layer{layers - 1}" if layers > 1 else "layer0", data=data) + "\n" + text


def probe() -> None:
    """Health check of a service: exits 1 unless its role accepts connections on its receiving port.
    Reads the addresses as plain text: importing the pipeline (and torch) every 10 s would cost more than it checks."""
    env = os.environ
    role = env["FFPIPE_ROLE"]
    addr = {"source": env["FFPIPE_SOURCE_ADDR"], "sink": env["FFPIPE_SINK_ADDR"]}.get(role)
    if addr is None:
        addr = env["FFPIPE_LAYER_ADDRS"].split(",")[int(env["FFPIPE_INDEX"])]
    port = int(addr.rpartition(":")[2])
    host = env.get("FFPIPE_BIND_HOST", "127.0.0.1")
    try:
        socket.create_connection(("127.0.0.1" if host == "0.0.0.0" else host, port), timeout=2).close()
    except OSError as e:
        raise SystemExit(f"ffpipe {role}: nothing accepts connections on port {port} ({e})") from None


class _MergeKey(str):
    """The YAML merge key `<<` (a plain str key would be quoted, and a quoted '<<' merges nothing)."""


_MERGE = _MergeKey("<<")


def _yaml_dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        NAMES = ("ffpipe", "env")  # the only two shared objects, in the order they first appear

        def generate_anchor(self, node):
            self.last_anchor_id += 1
            return self.NAMES[self.last_anchor_id - 1]

    Dumper.add_representer(_MergeKey, lambda d, data: d.represent_scalar("tag:yaml.org,2002:merge", "<<"))
    Dumper.add_representer(list, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))
    return Dumper
