"""Shared fixtures: the prepared models folder, one real local Ray cluster with the session's Serve app, a
factory for extra apps beside it, and a private head. The tiers (markers) are checked here too.

Every test module sets its tier with a module-level ``pytestmark`` (see ``[tool.pytest.ini_options]``
in pyproject.toml): ``unit`` < ``models`` < ``serve`` < ``cluster``. A test may carry a heavier tier than
its module (e.g. one real-head test among a module's unit checks); it then belongs to the heavier one, so
``-m "not (models or serve or cluster)"`` (``make test-fast``) selects exactly the unit tier.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TIERS = ("unit", "models", "serve", "cluster")  # lightest first


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test has a tier: a module without ``pytestmark`` (or a test without a tier) is a collection error."""
    untiered = sorted({item.nodeid.split("::")[0] for item in items
                       if not any(item.get_closest_marker(t) for t in TIERS)})
    if untiered:
        raise pytest.UsageError(f"tests without a tier marker ({', '.join(TIERS)}): {untiered}")


# ---------------------------------------------------------------- models (tier `models` and up)

@pytest.fixture(scope="session")
def models_dir() -> Path:
    from coact.cluster.prepare import ensure_models

    return ensure_models()


# ---------------------------------------------------------------- the session's Ray and Serve (tier `serve`)

@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    from coact.cluster.runtime import start_ray, stop_ray

    # A short private temp dir (Ray's socket paths must stay under the Unix limit; runs must not share state).
    started, tmp = start_ray(num_cpus=4)
    yield
    stop_ray(started, tmp)


@pytest.fixture(scope="session")
def serve_port(ray_cluster: None) -> Iterator[int]:
    """Serve's one HTTP port on this cluster: every app of the session is served on it, each on its route."""
    from ray import serve

    from coact.cluster.runtime import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


class ActionServer:
    """The session's reference action server, which a test may take down and bring back on the same port and db."""

    def __init__(self, db_path: Path) -> None:
        from coact.cluster.action_server.process import start_action_server

        self.proc = start_action_server(db_path=db_path)
        self.url, self.port, self.db_path = self.proc.url, self.proc.port, self.proc.db_path

    def get(self, path: str, **params) -> object:
        import httpx

        return httpx.get(f"{self.url}{path}", params=params, timeout=10).json()

    def faults(self, **faults) -> None:
        """Inject faults (`delay_s`, `status`, `actions`); none given: clear them."""
        import httpx

        r = (httpx.put(f"{self.url}/v1/admin/faults", json=faults, timeout=10) if faults
             else httpx.delete(f"{self.url}/v1/admin/faults", timeout=10))
        r.raise_for_status()

    def down(self) -> None:
        self.proc.stop()

    def up(self) -> None:
        from coact.cluster.action_server.process import start_action_server

        if not self.proc.alive():
            self.proc.close()
            self.proc = start_action_server(port=self.port, db_path=self.db_path)


@pytest.fixture(scope="session")
def action_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ActionServer]:
    """The reference action server (a real HTTP server on SQLite) that every app of the session executes on."""
    server = ActionServer(tmp_path_factory.mktemp("actions") / "action_server.sqlite")
    yield server
    server.proc.close()


@pytest.fixture(scope="session")
def audit_log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The audit log of the session's cluster (one per cluster: the first app's path holds for all)."""
    return tmp_path_factory.mktemp("audit") / "audit.sqlite"


@pytest.fixture(scope="session")
def actions_args(action_server, audit_log_path: Path) -> dict:
    """build_app's `actions` section pointing at the session's action server."""
    return {"webhooks": {"bank": {"url": action_server.url}}, "audit_log": str(audit_log_path)}


@pytest.fixture(scope="session")
def app_url(models_dir: Path, serve_port: int, actions_args: dict) -> str:
    """The app the serve-tier modules share (name ``coact``, route ``/``, LM replies). Nothing may break it:
    a test that kills replicas or changes deployments does so on an app of its own (``serve_app``)."""
    from coact.cluster.runtime import deploy

    return deploy({"models": str(models_dir), "responder": {"generate": True, "max_new_tokens": 20},
                   "actions": actions_args}, port=serve_port, timeout_s=600)


class ExtraApps:
    """Deploys apps of the graph beside the shared one and deletes every one of them at teardown; their actions
    run on the session's action server unless `args` give an `actions` section of their own."""

    def __init__(self, models_dir: Path, port: int, actions: dict) -> None:
        self.models_dir, self.port, self.names, self.actions = models_dir, port, [], actions

    def __call__(self, name: str, args: dict | None = None, *, deployments: list[dict] | None = None,
                 timeout_s: float = 600.0) -> str:
        """Deploy app `name` on route ``/<name>`` with build_app `args` (``models`` filled in); its base URL.

        With `deployments` (per-deployment overrides such as a ``user_config``) the app is deployed from a
        Serve config, as ``serve deploy`` does; calling again with the same name and args and other overrides
        updates the live app the way an operator's edited config file does.
        """
        from coact.cluster.runtime import deploy, wait_healthy
        from tests.helpers.serve import wait_running

        if name not in self.names:
            self.names.append(name)  # before deploying: a deploy that fails half-way is deleted too
        args = {"models": str(self.models_dir), "actions": self.actions, **(args or {})}
        if deployments is None:
            return deploy(args, port=self.port, name=name, route_prefix=f"/{name}", timeout_s=timeout_s)
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        app = {"name": name, "route_prefix": f"/{name}", "import_path": "coact.graphs.serving.app:build_app",
               "args": args, "deployments": deployments}
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))
        url = f"http://127.0.0.1:{self.port}/{name}"
        wait_running(name, timeout_s=timeout_s)
        wait_healthy(url, timeout_s)
        return url

    def delete_all(self) -> None:
        from ray import serve

        for name in reversed(self.names):
            serve.delete(name)
        self.names.clear()


@pytest.fixture
def serve_app(models_dir: Path, serve_port: int, actions_args: dict) -> Iterator[Callable[..., str]]:
    """A factory for apps beside the shared one, deleted when the test ends (passed or not)."""
    apps = ExtraApps(models_dir, serve_port, actions_args)
    yield apps
    apps.delete_all()


@pytest.fixture(scope="module")
def serve_app_module(models_dir: Path, serve_port: int, actions_args: dict) -> Iterator[Callable[..., str]]:
    """`serve_app` for an app that a whole module shares (e.g. one engine start paid once), deleted after it."""
    apps = ExtraApps(models_dir, serve_port, actions_args)
    yield apps
    apps.delete_all()


TEMPLATE_APP = "coact-templates"


@pytest.fixture(scope="session")
def template_app_url(models_dir: Path, serve_port: int, actions_args: dict) -> Iterator[str]:
    """A second app of the graph with template replies (no LM), shared by the modules that need exact replies
    and many turns (the dialogue set, the action step). Nothing may change it: updating a deployment is for
    apps of one's own (``serve_app``)."""
    apps = ExtraApps(models_dir, serve_port, actions_args)
    yield apps(TEMPLATE_APP, {"responder": {"generate": False}})
    apps.delete_all()


# ---------------------------------------------------------------- a private head (tier `cluster`)

@pytest.fixture(scope="session")
def ray_head() -> Iterator[object]:
    """A private `ray start --head` with the dashboard (Jobs API), token auth on, own HOME/temp dir/ports."""
    from coact.cluster.runtime import start_head

    head = start_head(num_cpus=2)
    yield head
    pids = head.descendants()
    killed = head.stop()
    # Every process the head started must be gone, without a machine-wide `ray stop`.
    assert not killed, f"head processes needed SIGKILL after SIGTERM: {killed}"
    import psutil

    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


# ---------------------------------------------------------------- a real Redis (the sessions' redis backend)

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A `redis-server` of the session's own (free port, own folder, append-only file), stopped by PID at the end.
    A test may kill it and start it again (same port and folder); it must leave it running. Missing binary: a
    failure in CI (`make services` installs it), a skip elsewhere."""
    from tests.helpers.redis import RedisServer, redis_server_binary

    binary = redis_server_binary()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed: `make services` installs it")
        pytest.skip("redis-server is not installed (`make services`)")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
