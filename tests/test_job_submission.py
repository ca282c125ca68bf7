"""Every job entrypoint through `ray job submit`, and one through the Jobs API (JobSubmissionClient).

The head (`cluster.runtime.start_head`, fixture `ray_head`) is a real `ray start --head` with the dashboard and token
authentication on; the clients get its token deliberately (env for the CLI, a header for the SDK). The four
CLI submissions run concurrently (smallest configurations) so the suite pays for the slowest, not the sum.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from coact.cluster.runtime import PrivateHead
from tests.helpers import REPO

RAY = str(Path(sys.executable).parent / "ray")
SUBMIT_TIMEOUT_S = 900.0
# The uploaded package is the source tree only (Ray also skips .gitignored paths; this makes it explicit).
EXCLUDES = ["models/", ".venv/", "results/", ".git/", "notebooks/", "*.pyc", "__pycache__/"]


def runtime_env(models_dir: Path) -> dict:
    from coact.cluster.datasets import _source

    data_dir, _ = _source()  # the folder the tests themselves read: absolute, the upload has no ../shared
    return {"env_vars": {"COACT_MODELS_DIR": str(models_dir), "COACT_DATA_DIR": str(Path(data_dir).resolve()),
                         "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                         "TOKENIZERS_PARALLELISM": "false", "COACT_TORCH_THREADS": "1"},
            "excludes": EXCLUDES}


def job_args(name: str, models_dir: Path, out: Path) -> list[str]:
    """The smallest configuration of each job that still runs its whole code path."""
    return {
        "train_intent": ["--train-per-class", "3", "--val-per-class", "2", "--epochs", "1", "--max-length", "16",
                         "--no-test", "--no-progress", "--threads", "1", "--output", str(out),
                         "--model-out", str(out / "model")],
        "evaluate": ["--model", str(models_dir / "intent"), "--limit", "200", "--oos-limit", "100",
                     "--out", str(out), "--no-progress", "--threads", "1"],
        "tune_intent": ["--smoke", "--verbose", "0", "--output", str(out)],
        "tune_policy": ["--smoke", "--verbose", "0", "--max-concurrent", "1", "--output", str(out)],
    }[name]


pytestmark = pytest.mark.cluster
JOBS = ("train_intent", "evaluate", "tune_intent", "tune_policy")


@pytest.fixture(scope="module")
def api_submission(ray_head: PrivateHead, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny evaluation submitted through JobSubmissionClient (token as a header); not waited for here."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head.dashboard_url, headers=ray_head.auth_headers())
    out = tmp_path_factory.mktemp("jobs-api") / "eval"
    entrypoint = " ".join(["python", "-m", "coact.cluster.jobs.evaluate", "--model", str(models_dir / "intent"),
                           "--limit", "100", "--oos-limit", "50", "--out", str(out), "--no-progress",
                           "--threads", "1"])
    job_id = client.submit_job(entrypoint=entrypoint, metadata={"test": "jobs-api"},
                               runtime_env={"working_dir": str(REPO), **runtime_env(models_dir)})
    return {"client": client, "job_id": job_id, "out": out, "entrypoint": entrypoint, "t0": time.monotonic()}


@pytest.fixture(scope="module")
def cli_submissions(ray_head: PrivateHead, models_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                    api_submission: dict) -> dict:
    """`ray job submit --working-dir . -- python -m coact.cluster.jobs.<name> …` for every job, side by side
    (and beside the Jobs API submission, already running)."""
    root = tmp_path_factory.mktemp("jobs")
    renv = json.dumps(runtime_env(models_dir))
    procs: dict[str, tuple[subprocess.Popen, Path, Path, float]] = {}
    for name in JOBS:
        out, log = root / name, root / f"{name}.log"
        cmd = [RAY, "job", "submit", "--address", ray_head.dashboard_url, "--working-dir", ".",
               "--runtime-env-json", renv, "--submission-id", f"coact-{name}-{os.getpid()}",
               "--", "python", "-m", f"coact.cluster.jobs.{name}", *job_args(name, models_dir, out)]
        with open(log, "wb") as f:
            procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=ray_head.client_env(), stdout=f,
                                            stderr=subprocess.STDOUT), out, log, time.monotonic())
    results = {}
    deadline = time.monotonic() + SUBMIT_TIMEOUT_S
    for name, (proc, out, log, t0) in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()  # our own `ray job submit` client (the job itself dies with the head)
            rc = proc.wait(timeout=30)
        results[name] = {"rc": rc, "out": out, "log": log.read_text(errors="replace"),
                         "seconds": time.monotonic() - t0}
    print("\n" + ", ".join(f"{n}: {r['seconds']:.0f} s" for n, r in results.items()))
    return results


def succeeded(results: dict, name: str) -> dict:
    r = results[name]
    assert r["rc"] == 0, f"{name}: `ray job submit` exited {r['rc']}\n{r['log'][-6000:]}"
    assert f"Job 'coact-{name}-" in r["log"] and "succeeded" in r["log"], r["log"][-3000:]
    return r


def test_client_without_token_is_refused(ray_head: PrivateHead, tmp_path: Path) -> None:
    # Auth stays on: the same CLI without this head's token (a fresh HOME, no token env) is turned away.
    env = {k: v for k, v in ray_head.client_env().items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)
    r = subprocess.run([RAY, "job", "list", "--address", ray_head.dashboard_url], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert "token" in (r.stdout + r.stderr).lower()


def test_submit_train_intent(cli_submissions: dict) -> None:
    from coact.actors.intent_models import SequenceIntentClassifier, load_intent_model
    from coact.actors.models import read_meta

    out = succeeded(cli_submissions, "train_intent")["out"]
    summary = json.loads((out / "train_summary.json").read_text())
    history = pd.read_csv(out / "history.csv")
    # The summary describes the run that was asked for (job_args) and the model folder it wrote.
    assert (summary["config"]["epochs"], summary["config"]["max_length"]) == (1, 16), summary["config"]
    assert summary["epochs_run"] == len(history) == 1 and summary["best_epoch"] == 1
    assert summary["model"] == str(out / "model") and summary["version"] == read_meta(out / "model")["version"]
    best = history.iloc[summary["best_epoch"] - 1]
    assert summary["val"] == pytest.approx({k: float(best[k]) for k in ("val_accuracy", "val_macro_f1", "val_loss")})
    assert 0 < summary["n_train"] <= 3 * 78 and 0 < summary["n_val"] <= 2 * 78, summary
    assert "test" not in summary  # --no-test
    model = load_intent_model(out / "model")  # the job's model folder loads in this process
    assert isinstance(model, SequenceIntentClassifier) and len(model.labels) == 78


def test_submit_evaluate(cli_submissions: dict) -> None:
    out = succeeded(cli_submissions, "evaluate")["out"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"]["n_test"] == 200 and rep["data"]["n_oos_test"] == 100
    assert 0.5 <= rep["accuracy"] <= 1.0 and 0.5 <= rep["out_of_scope"]["auroc"] <= 1.0
    assert {"text", "true_label", "predicted_label"} <= set(pd.read_csv(out / "errors.csv").columns)
    for png in ("confusion_matrix.png", "reliability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_submit_tune_intent(cli_submissions: dict) -> None:
    from coact.cluster.jobs import tune_intent

    out = succeeded(cli_submissions, "tune_intent")["out"]
    results = pd.read_csv(out / "results.csv")
    assert len(results) == tune_intent.SMOKE["num_samples"]
    assert (results["status"] != "error").all(), results.get("error")
    best = json.loads((out / "best_config.json").read_text())
    assert best["best_val_macro_f1"] == pytest.approx(results["best_val_macro_f1"].max())
    assert json.loads((out / "evaluation" / "report.json").read_text())["accuracy"] > 0


def test_submit_tune_policy(cli_submissions: dict) -> None:
    from coact.cluster.jobs import tune_policy

    out = succeeded(cli_submissions, "tune_policy")["out"]
    results = pd.read_csv(out / "results.csv")
    assert len(results) == tune_policy.SMOKE["num_samples"]
    weights = json.loads((out / "best_weights.json").read_text())["weights"]
    assert weights and all(isinstance(v, float) for v in weights.values())
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["reports"]) == {"default", "tuned", "oracle"}


def test_jobs_api_end_to_end(api_submission: dict, cli_submissions: dict) -> None:
    """Through JobSubmissionClient: submitted (fixture), wait, read the logs, check status and artefacts."""
    from ray.job_submission import JobStatus

    client, job_id, out = api_submission["client"], api_submission["job_id"], api_submission["out"]
    deadline = time.monotonic() + SUBMIT_TIMEOUT_S
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                           JobStatus.STOPPED):
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        time.sleep(1.0)
    print(f"\njobs API evaluate: {time.monotonic() - api_submission['t0']:.0f} s (includes waiting for the CLI jobs)")
    logs = client.get_job_logs(job_id)
    info = client.get_job_info(job_id)
    assert status == JobStatus.SUCCEEDED, f"{info.message}\n{logs[-4000:]}"
    assert info.metadata["test"] == "jobs-api" and info.entrypoint == api_submission["entrypoint"]
    assert f"artefacts: {out}" in logs  # the job prints where its artefacts went
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"]["n_test"] == 100 and rep["data"]["n_oos_test"] == 50
    assert 0.5 <= rep["accuracy"] <= 1.0
    assert job_id in {j.submission_id for j in client.list_jobs()}
