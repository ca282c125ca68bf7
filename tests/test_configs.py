"""Serve configs, the KubeRay RayService, the cluster-launcher YAML and the Dockerfile, checked with Ray's own
schemas and validation; the Serve configs are also deployed on a real head to read back what Serve applied."""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
SERVE = REPO / "cluster" / "serve"
CONFIGS = {"local": SERVE / "local.yaml", "gpu": SERVE / "gpu.yaml"}
LAUNCHER = REPO / "cluster" / "launcher" / "aws.yaml"
MANIFEST = REPO / "cluster" / "kuberay" / "rayservice.yaml"
DEPLOYMENTS = {"ChatIngress", "IntentActor", "ReasonerActor", "DecisionActor", "ActionActor", "ResponderActor"}
GPU_STAGES = {"ReasonerActor", "ResponderActor"}
GiB = 1024**3


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def app_of(cfg: dict) -> dict:
    (app,) = cfg["applications"]
    return app


def deployments_of(cfg: dict) -> dict[str, dict]:
    """Per deployment, the Serve options the file's args give it (AppConfig's stage sections, as build_app
    applies them): the one place a file sets them."""
    from coact.graphs.serving.http import DEPLOYMENT_NAMES, AppConfig

    args = AppConfig.model_validate(app_of(cfg)["args"])
    return {name: getattr(args, stage).deployment.serve_options() for stage, name in DEPLOYMENT_NAMES.items()}


def bound_names(app: Any) -> set[str]:
    """Deployment names of a built Application graph."""
    return set(bound_deployments(app))


def bound_deployments(app: Any) -> dict[str, Any]:
    """The Deployment objects of a built Application graph by name (walks the bound init args)."""
    from ray.serve import Application

    dep = app._bound_deployment
    found = {dep.name: dep}
    for value in [*dep.init_args, *dep.init_kwargs.values()]:
        if isinstance(value, Application):
            found |= bound_deployments(value)
    return found


# ---------------------------------------------------------------- Serve configs (schema level)

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_serve_config_validates_and_builds(name: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    from coact.graphs.serving.app import build_app
    from coact.graphs.serving.http import AppConfig

    cfg = load(CONFIGS[name])
    schema = ServeDeploySchema.model_validate(cfg)  # Ray's own schema of `serve deploy` / `serve run` files
    (app,) = schema.applications
    assert app.import_path == "coact.graphs.serving.app:build_app"
    AppConfig.model_validate(app.args)  # extra="forbid": a misspelt arg fails here, not on the cluster
    built = build_app(app.args)
    assert bound_names(built) == DEPLOYMENTS == set(deployments_of(cfg))
    # The args are the one source of the deployments' options: no `deployments:` list repeats them, and the
    # built graph carries exactly what the args say.
    assert "deployments" not in cfg["applications"][0]
    for name, dep in bound_deployments(built).items():
        want = deployments_of(cfg)[name]
        assert dep.ray_actor_options == want["ray_actor_options"], name
        assert dep.max_ongoing_requests == want["max_ongoing_requests"], name
        assert dep.max_queued_requests == want["max_queued_requests"], name
        if "autoscaling_config" in want:
            got = dep._deployment_config.autoscaling_config
            assert {k: getattr(got, k) for k in want["autoscaling_config"]} == want["autoscaling_config"], name
        else:
            assert dep.num_replicas == want.get("num_replicas", 1), name


def test_gpu_config_is_deliberate() -> None:
    from coact.graphs.serving.http import AppConfig

    cfg = load(CONFIGS["gpu"])
    args = AppConfig.model_validate(app_of(cfg)["args"])
    batch = {"IntentActor": args.intent.batching.max_batch_size, "ReasonerActor": args.reasoner.batching.max_batch_size,
             "ResponderActor": args.responder.batching.max_batch_size}
    for name, d in deployments_of(cfg).items():
        auto = d["autoscaling_config"]
        assert "num_replicas" not in d, name  # autoscaled, never pinned
        for key in ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"):
            assert key in auto, (name, key)
        assert 1 <= auto["min_replicas"] <= auto["max_replicas"], name
        # Serve never scales up when a replica cannot even hold its target load.
        assert auto["target_ongoing_requests"] <= d["max_ongoing_requests"], name
        assert auto["upscale_delay_s"] < auto["downscale_delay_s"], name
        assert d["max_queued_requests"] >= d["max_ongoing_requests"], name
        # Every resource is spelt out (the defaults are sized for two shared CPUs, not for these nodes).
        opts = d["ray_actor_options"]
        assert {"num_cpus", "num_gpus", "memory"} <= set(opts), name
        assert (opts["num_gpus"] > 0) == (name in GPU_STAGES), name
        if name in batch:  # room for a full batch on every replica, with the next one filling
            assert d["max_ongoing_requests"] >= 2 * batch[name], name
    deps = deployments_of(cfg)
    # The Responder admits as many turns as the engine batches (vLLM's max_num_seqs), no more.
    assert args.responder.backend == "vllm"
    assert deps["ResponderActor"]["max_ongoing_requests"] == args.responder.vllm.max_num_seqs


@pytest.mark.parametrize(("args", "field", "needle"), [
    ({"responder": {"max_new_token": 8}}, "responder.max_new_token", "Extra inputs"),
    ({"intent": {"batching": {"max_batch_size": 0}}}, "intent.batching.max_batch_size", "greater than or equal"),
    ({"reasoner": {"deployment": {"ray_actor_options": {"num_cpu": 1}}}},
     "reasoner.deployment.ray_actor_options.num_cpu", "Extra inputs"),
    ({"responder": {"backend": "tgi"}}, "responder.backend", "'transformers', 'vllm' or 'scripted'"),
    # Serve's own checks, named by the section: a count beside autoscaling, bounds the wrong way round
    ({"responder": {"deployment": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 4}}}}, "responder",
     "deployment: Manually setting num_replicas is not allowed"),
    ({"decision": {"deployment": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 1}}}}, "decision",
     "deployment: max_replicas (1) must be greater than or equal to min_replicas (3)"),
    ({"intent": {"deployment": {"autoscaling_config": {"max_replica": 3}}}}, "intent",
     "deployment.autoscaling_config: unknown field 'max_replica'"),
])
def test_bad_config_names_the_field(args: dict, field: str, needle: str) -> None:
    from pydantic import ValidationError

    from coact.graphs.serving.app import build_app

    with pytest.raises(ValidationError) as e:
        build_app(args)
    (err,) = e.value.errors()
    assert ".".join(str(x) for x in err["loc"]) == field and needle in err["msg"], err


def test_a_section_is_laid_over_the_stage_defaults() -> None:
    from coact.graphs.serving.http import AppConfig

    cfg = AppConfig.model_validate({"responder": {"deployment": {"ray_actor_options": {"num_gpus": 1}}}})
    dep = cfg.responder.deployment
    # the Responder's own CPUs and request limits stay; only the GPU changed
    assert (dep.ray_actor_options.num_cpus, dep.ray_actor_options.num_gpus) == (0.5, 1)
    assert (dep.max_ongoing_requests, dep.max_queued_requests) == (32, 256)
    assert AppConfig().intent.deployment.ray_actor_options.num_cpus == 0.25


def test_flat_keys_are_refused_with_their_name() -> None:
    # One config surface: a setting lives in its stage's section only.
    from coact.graphs.serving.http import AppConfig

    with pytest.raises(ValueError, match="max_new_tokens"):
        AppConfig.model_validate({"max_new_tokens": 8})
    assert AppConfig.model_validate({"responder": {"max_new_tokens": 8}}).responder.max_new_tokens == 8


def test_local_config_fits_two_cpus() -> None:
    cfg = load(CONFIGS["local"])
    assert cfg["http_options"]["host"] == "127.0.0.1"
    deps = deployments_of(cfg)
    assert all(d["ray_actor_options"]["num_gpus"] == 0 for d in deps.values())
    total = sum(d.get("num_replicas", 1) * d["ray_actor_options"]["num_cpus"] for d in deps.values())
    assert total <= 1.5, total  # leaves room on 2 CPUs for the session store and the jobs


# ---------------------------------------------------------------- node types: fit at max_replicas

class Node(BaseModel):
    cpu: float
    gpu: float
    memory: float  # bytes available to replicas


def replica_needs(d: dict) -> tuple[float, float, float]:
    o = d["ray_actor_options"]
    return float(o.get("num_cpus", 1)), float(o.get("num_gpus", 0)), float(o.get("memory", 0))


def pack(replicas: list[tuple[str, tuple[float, float, float]]], nodes: list[Node]) -> list[str]:
    """First-fit decreasing like Ray's scheduler would find room; returns the replicas left unplaced.

    A fractional GPU request must fit on one device, and these node types have at most one GPU each, so a
    node's GPU capacity is a single bin.
    """
    free = [n.model_copy() for n in nodes]
    unplaced = []
    for name, (cpu, gpu, mem) in sorted(replicas, key=lambda r: (r[1][1], r[1][0], r[1][2]), reverse=True):
        for n in free:
            if n.cpu + 1e-9 >= cpu and n.gpu + 1e-9 >= gpu and n.memory + 1e-9 >= mem:
                n.cpu, n.gpu, n.memory = n.cpu - cpu, n.gpu - gpu, n.memory - mem
                break
        else:
            unplaced.append(name)
    return unplaced


def check_fit(groups: dict[str, tuple[Node, int, int]]) -> None:
    """CPU stages on the CPU group, GPU stages on the GPU group, at max (and at min) replicas and workers."""
    deps = deployments_of(load(CONFIGS["gpu"]))
    for which in ("max", "min"):
        for group, stages in (("cpu", DEPLOYMENTS - GPU_STAGES), ("gpu", GPU_STAGES)):
            node, lo, hi = groups[group]
            count = hi if which == "max" else lo
            replicas = [(f"{s}#{i}", replica_needs(deps[s])) for s in stages
                        for i in range(deps[s]["autoscaling_config"][f"{which}_replicas"])]
            assert not pack(replicas, [node] * count), (which, group, pack(replicas, [node] * count))
    # ... and the check has teeth: one node fewer at max does not hold them.
    node, _, hi = groups["gpu"]
    replicas = [(f"{s}#{i}", replica_needs(deps[s])) for s in GPU_STAGES
                for i in range(deps[s]["autoscaling_config"]["max_replicas"])]
    assert pack(replicas, [node] * (hi - 1))


def test_pack_detects_a_misfit() -> None:
    node = Node(cpu=8, gpu=1, memory=24 * GiB)
    assert pack([("a", (2, 1, 16 * GiB)), ("b", (1, 0.25, 2 * GiB))], [node]) == ["b"]
    assert pack([("a", (2, 0.5, GiB)), ("b", (1, 0.5, GiB))], [node]) == []


# ---------------------------------------------------------------- cluster launcher

def test_launcher_config_validates_and_fits() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(LAUNCHER)
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` does first: defaults for the provider merged in
    validate_config(prepared)  # Ray's JSON schema + its own consistency checks
    types = prepared["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"} and prepared["head_node_type"] == "head"
    assert types["head"]["resources"].get("CPU", 0) == 0  # no replicas on the head
    assert types["gpu_worker"]["resources"]["GPU"] >= 1 and "GPU" not in types["cpu_worker"]["resources"]
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != "head") <= prepared["max_workers"]
    # token auth on every node, with the operator's token copied to where Ray looks for it
    for cmd in prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE=token" in cmd
    assert any(k.endswith("/.ray/auth_token") for k in prepared["file_mounts"])

    def node(t: dict) -> Node:
        r = t["resources"]
        return Node(cpu=r.get("CPU", 0), gpu=r.get("GPU", 0), memory=r["memory"])

    check_fit({"cpu": (node(types["cpu_worker"]), types["cpu_worker"]["min_workers"],
                       types["cpu_worker"]["max_workers"]),
               "gpu": (node(types["gpu_worker"]), types["gpu_worker"]["min_workers"],
                       types["gpu_worker"]["max_workers"])})
    broken = copy.deepcopy(prepared)
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    with pytest.raises(Exception, match="one"):
        validate_config(broken)


# ---------------------------------------------------------------- KubeRay RayService

class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Container(_Open):
    name: str
    image: str
    workingDir: str
    env: list[dict] = []
    resources: dict[str, dict[str, str | int]]


class PodSpec(_Open):
    containers: list[Container] = Field(min_length=1)


class PodTemplate(_Open):
    spec: PodSpec


class HeadGroupSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rayStartParams: dict[str, str]  # the CRD wants strings
    template: PodTemplate


class WorkerGroupSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    groupName: str
    replicas: int = Field(ge=0)
    minReplicas: int = Field(ge=0)
    maxReplicas: int = Field(ge=1)
    rayStartParams: dict[str, str]
    template: PodTemplate


class AuthOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: str
    secretName: str | None = None


class RayClusterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rayVersion: str
    authOptions: AuthOptions
    enableInTreeAutoscaling: bool = False
    autoscalerOptions: dict[str, Any] = {}
    headGroupSpec: HeadGroupSpec
    workerGroupSpecs: list[WorkerGroupSpec]


class RayServiceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    serveConfigV2: str
    rayClusterConfig: RayClusterSpec


class RayService(BaseModel):
    model_config = ConfigDict(extra="forbid")
    apiVersion: str
    kind: str
    metadata: dict[str, Any]
    spec: RayServiceSpec


def k8s_quantity(q: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    assert m and (not m.group(2) or m.group(2) in units), q
    return float(m.group(1)) * units.get(m.group(2), 1)


def test_rayservice_manifest() -> None:
    import ray
    from ray.serve.schema import ServeDeploySchema

    from coact.cluster.kuberay import render

    svc = RayService.model_validate(load(MANIFEST))
    assert (svc.apiVersion, svc.kind) == ("ray.io/v1", "RayService")
    serve_cfg = yaml.safe_load(svc.spec.serveConfigV2)
    ServeDeploySchema.model_validate(serve_cfg)
    assert serve_cfg == load(CONFIGS["gpu"]), "serveConfigV2 differs from gpu.yaml: python -m coact.cluster.kuberay --write"
    assert MANIFEST.read_text() == render(), "python -m coact.cluster.kuberay --write"
    cluster = svc.spec.rayClusterConfig
    assert cluster.rayVersion == ray.__version__
    assert cluster.authOptions.mode == "token" and cluster.enableInTreeAutoscaling
    assert cluster.headGroupSpec.rayStartParams.get("num-cpus") == "0"
    groups = {g.groupName: g for g in cluster.workerGroupSpecs}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    images = {c.image for g in [cluster.headGroupSpec, *groups.values()] for c in g.template.spec.containers}
    assert len(images) == 1  # one image (the Dockerfile's) everywhere
    for g in groups.values():
        assert g.minReplicas <= g.replicas <= g.maxReplicas

    def node(g: WorkerGroupSpec) -> Node:
        (c,) = g.template.spec.containers
        limits = c.resources["limits"]
        assert c.resources["requests"] == limits, g.groupName  # guaranteed QoS: what Ray sees is what it gets
        return Node(cpu=k8s_quantity(limits["cpu"]), gpu=k8s_quantity(limits.get("nvidia.com/gpu", 0)),
                    memory=k8s_quantity(limits["memory"]) - int(g.rayStartParams["object-store-memory"]))

    cpu, gpu = groups["cpu-workers"], groups["gpu-workers"]
    assert node(gpu).gpu == 1 and node(cpu).gpu == 0
    check_fit({"cpu": (node(cpu), cpu.minReplicas, cpu.maxReplicas),
               "gpu": (node(gpu), gpu.minReplicas, gpu.maxReplicas)})
    # Same node-group bounds as the cluster launcher's node types.
    launcher = load(LAUNCHER)["available_node_types"]
    assert (cpu.minReplicas, cpu.maxReplicas) == (launcher["cpu_worker"]["min_workers"],
                                                  launcher["cpu_worker"]["max_workers"])
    assert (gpu.minReplicas, gpu.maxReplicas) == (launcher["gpu_worker"]["min_workers"],
                                                  launcher["gpu_worker"]["max_workers"])


def test_dockerfile_matches_the_manifests() -> None:
    import ray

    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py311")
    for path in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for p in path.split():
            assert (REPO / p).exists(), p
    assert "COACT_MODELS_DIR=/app/models" in text and "WORKDIR /app" in text
    # gpu.yaml's Responder backend must be installed in the image it runs on.
    from coact.graphs.serving.http import AppConfig

    backend = AppConfig.model_validate(app_of(load(CONFIGS["gpu"]))["args"]).responder.backend
    if backend == "vllm":
        assert re.search(r"^ARG EXTRAS=\S*vllm", text, re.M), "the image lacks the vllm extra gpu.yaml needs"
    manifest = load(MANIFEST)["spec"]["rayClusterConfig"]
    container = manifest["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert container["workingDir"] == "/app"
    assert {"name": "COACT_MODELS_DIR", "value": "/app/models"} in container["env"]
    assert load(LAUNCHER)["docker"]["image"] == container["image"]


# ---------------------------------------------------------------- a real Serve: what it applies from the files

def applied_configs(head: Any, apps: set[str], timeout_s: float = 300.0) -> dict[str, dict]:
    """Per app, the deployments the Serve controller reports (options applied, required resources) once built."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        r = httpx.get(f"{head.dashboard_url}/api/serve/applications/", headers=head.auth_headers(), timeout=10)
        r.raise_for_status()
        last = r.json().get("applications", {})
        failed = {a: v.get("message") for a, v in last.items() if v.get("status") == "DEPLOY_FAILED"}
        assert not failed, failed
        if all(set(last.get(a, {}).get("deployments", {})) == DEPLOYMENTS for a in apps):
            return {a: last[a]["deployments"] for a in apps}
        time.sleep(1.0)
    raise TimeoutError(f"apps not built after {timeout_s:.0f} s: {json.dumps(last)[:2000]}")


@pytest.mark.cluster
def test_configs_take_effect_on_a_real_serve(tmp_path: Path) -> None:
    """`serve deploy` both files (as two apps of one config) to a real head; read back what Serve applied.

    The head has no CPUs or GPUs, so replicas stay pending and no model is loaded: what is checked is the
    controller's record of the options build_app set from each file's args.
    """
    import subprocess
    import sys

    from ray.serve.schema import ServeDeploySchema

    from coact.cluster.runtime import free_port, start_head

    apps = []
    for name, path in CONFIGS.items():  # only the app's name and route differ from the files
        app = app_of(load(path))
        apps.append({**app, "name": f"coact-{name}", "route_prefix": f"/{name}"})
    combined = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": free_port()},
                "applications": apps}
    ServeDeploySchema.model_validate(combined)
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump(combined))
    t0 = time.monotonic()
    # Workers import coact.graphs.serving.app from the checkout (the image has it installed instead).
    head = start_head(num_cpus=0, env={"PYTHONPATH": str(REPO)})
    print(f"\nhead up in {time.monotonic() - t0:.0f} s")
    try:
        r = subprocess.run([str(Path(sys.executable).parent / "serve"), "deploy", str(path), "--address",
                            head.dashboard_url], env=head.client_env(), cwd=REPO, capture_output=True, text=True,
                           timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        applied = applied_configs(head, {f"coact-{n}" for n in CONFIGS})
        print(f"both apps built after {time.monotonic() - t0:.0f} s")
    finally:
        t1 = time.monotonic()
        killed = head.stop()
        print(f"head stopped in {time.monotonic() - t1:.0f} s")
    assert not killed
    for name, cfg_path in CONFIGS.items():
        for dep, want in deployments_of(load(cfg_path)).items():
            got = applied[f"coact-{name}"][dep]
            cfg = got["deployment_config"]
            for key in ("max_ongoing_requests", "max_queued_requests", "num_replicas"):
                if key in want:
                    assert cfg[key] == want[key], (name, dep, key)
            for key, value in want["ray_actor_options"].items():
                assert cfg["ray_actor_options"][key] == value, (name, dep, key)
            # What the scheduler asks for per replica (the stages' defaults differ: see actors/config.py).
            need = got["required_resources"]
            assert need.get("CPU", 0) == want["ray_actor_options"]["num_cpus"], (name, dep, need)
            assert need.get("GPU", 0) == want["ray_actor_options"]["num_gpus"], (name, dep, need)
            if "autoscaling_config" in want:
                for key, value in want["autoscaling_config"].items():
                    assert cfg["autoscaling_config"][key] == value, (name, dep, key)
