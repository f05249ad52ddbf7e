"""AutoML on a real PostgreSQL server, as several machines share a study, and the asha algorithm.

The server is the PostgreSQL 16 that the `pgserver` wheel ships, started here from its initdb/postgres binaries:
pgserver's own `get_server` adds a system user with `useradd` and widens folder permissions up to / when run as
root, which a test must not do to a developer's machine. PostgreSQL refuses to run as root, so as root the server
runs as `nobody`. It listens on a unix socket in a private 0700 folder only (no TCP), asks for a random password
and dies with the test process (PR_SET_PDEATHSIG), so a killed test run leaves no server behind.

Workers run the real `skillbank automl worker` command line with two test-only stand-ins (see WORKER_SCRIPT): a
cheap trial instead of Grounding DINO training, and a heartbeat of seconds instead of minutes.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import pwd
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from runner.automl import run_automl
from runner.automl.study import OWNER_ATTR, PARAMS_ATTR, SURPLUS_ATTR, storage_url

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = "model_epoch_002_step_00002.pth"
GATE_ENV = "AUTOML_TEST_GATE"  # a file path: trials wait at their first epoch until it exists
HOST_ENV = "AUTOML_TEST_HOST"  # the host name a worker records as its trials' owner
HEARTBEAT, GRACE = 1, 3  # seconds; the CLI's are 60 and 120
OTHER_HOST = "automl-test-other-machine"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def cheap_trial(trial, spec, trial_dir):
    """Two 'epochs' whose value peaks at lr = 1e-4, then a checkpoint file as training writes one."""
    with open(trial_dir / "runs", "a") as runs:  # one line per process that ran this trial
        runs.write(f"{os.getpid()}\n")
    gate = os.environ.get(GATE_ENV)
    while gate and not os.path.exists(gate):
        time.sleep(0.05)
    lr = spec["train"]["optim"]["lr"]
    value = 0.0
    for epoch in (1, 2):
        value = 1.0 / (1.0 + abs(math.log10(lr) + 4.0)) + 0.01 * epoch
        trial.report(value, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    (trial_dir / CHECKPOINT).write_bytes(f"weights of trial {trial.number}".encode())
    trial.set_user_attr("checkpoint", CHECKPOINT)
    return value


def _spec(results: Path, **automl) -> dict:
    settings = {"max_trials": 6, "algorithm": "tpe", "seed": 0,
                "automl_hyperparameters": ["train.optim.lr", "train.optim.weight_decay"], **automl}
    data = results.parent / "data"  # validated as paths, never read by the cheap trial
    return {
        "results_dir": str(results),
        "dataset": {"train_data_sources": [{"image_dir": str(data / "images"), "json_file": str(data / "t.jsonl")}],
                    "val_data_sources": {"image_dir": str(data / "images"), "json_file": str(data / "val.json")}},
        "train": {"num_epochs": 2},
        "automl": settings,
    }


# ------------------------------------------------------------------------------------------------ the server
class Postgres:
    """A throwaway PostgreSQL server on a unix socket in `folder`."""

    def __init__(self, folder: Path, password: str, process: subprocess.Popen):
        self.folder, self.password, self.process = folder, password, process

    def connect(self, database: str = "postgres"):
        import psycopg

        return psycopg.connect(host=str(self.folder), user="postgres", dbname=database, password=self.password,
                               connect_timeout=5, autocommit=True)

    def url(self, database: str, with_password: bool = False) -> str:
        """An Optuna storage URL; without the password, libpq reads it from PGPASSWORD."""
        secret = f":{self.password}" if with_password else ""
        return f"postgresql://postgres{secret}@/{database}?host={self.folder}"


def _binaries() -> Path:
    spec = importlib.util.find_spec("pgserver")  # found, not imported: importing it sets up pgserver's own locks
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pgserver is not installed (it is in the test extra: pip install -e '.[test]')")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


def _server_user() -> dict:
    """subprocess arguments that run the server as `nobody` when we are root (postgres refuses root)."""
    if os.geteuid() != 0:
        return {}
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root and there is no 'nobody' user to run PostgreSQL as (postgres refuses root)")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid}


def _die_with_us() -> None:
    """Runs in the server's process: SIGQUIT (PostgreSQL's immediate shutdown) when the test process dies."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGQUIT)  # 1 = PR_SET_PDEATHSIG


def _run(command: list, as_user: dict, what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, **as_user)
    if done.returncode != 0:
        pytest.skip(f"PostgreSQL from pgserver cannot {what} here: {(done.stderr or done.stdout).strip()[-500:]}")


def _wait_ready(server: Postgres, log: Path, seconds: float = 30) -> None:
    import psycopg

    deadline = time.monotonic() + seconds
    while True:
        try:
            server.connect().close()
            return
        except psycopg.OperationalError:
            if server.process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-800:] if log.is_file() else "(no log)"
                pytest.skip(f"PostgreSQL from pgserver did not start here:\n{tail}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def postgres():
    pytest.importorskip("psycopg", reason="psycopg (the PostgreSQL driver) is in the test extra")
    binaries = _binaries()
    as_user = _server_user()
    _run([str(binaries / "postgres"), "--version"], as_user, "run (its binaries must be executable by that user)")
    folder = Path(tempfile.mkdtemp(prefix="skillbank-pg-"))  # mode 0700: the socket is private
    process = None
    try:
        if as_user:
            os.chown(folder, as_user["user"], as_user["group"])
        password = secrets.token_urlsafe(24)
        password_file = folder / "password"
        password_file.write_text(password)
        if as_user:
            os.chown(password_file, as_user["user"], as_user["group"])
        _run([str(binaries / "initdb"), "-D", str(folder / "data"), "-U", "postgres", "--pwfile", str(password_file),
              "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync", "--no-instructions"], as_user, "initdb")
        password_file.unlink()
        log = folder / "server.log"
        with open(log, "w") as log_file:
            if as_user:
                os.chown(log, as_user["user"], as_user["group"])
            # no TCP at all (listen_addresses empty): clients come through the socket in `folder`
            process = subprocess.Popen(
                [str(binaries / "postgres"), "-D", str(folder / "data"), "-k", str(folder),
                 "-c", "listen_addresses=", "-c", "fsync=off", "-c", "max_connections=50"],
                stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=_die_with_us, **as_user)
        server = Postgres(folder, password, process)
        _wait_ready(server, log)
        yield server
    finally:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)  # fast shutdown: disconnects clients, no waiting for them
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_database(postgres, monkeypatch, request) -> str:
    """A fresh database on the server; returns its name. PGPASSWORD is set for this process and its children."""
    name = "automl_" + request.node.name.lower().replace("-", "_")[:40]
    with postgres.connect() as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.execute(f'CREATE DATABASE "{name}"')
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    return name


# ------------------------------------------------------------------------------------------------ workers
WORKER_SCRIPT = """
# `skillbank automl worker`: the console script's main, with test-only stand-ins installed first.
import os, socket, sys, types
sys.path.insert(0, {tests!r})
from test_automl_postgres import HEARTBEAT, GRACE, HOST_ENV, cheap_trial
import runner.automl.driver as driver
from runner.automl.study import open_storage

# the trial runner the worker imports: a cheap trial instead of Grounding DINO training
training = types.ModuleType("runner.automl.training")
training.train_trial = cheap_trial
sys.modules["runner.automl.training"] = training
# a heartbeat of seconds, so a dead worker's trial goes stale within the test
driver.open_storage = lambda url, *_: open_storage(url, HEARTBEAT, GRACE)
# a worker that records another host: only the heartbeat can tell that it died
if os.environ.get(HOST_ENV):
    socket.gethostname = lambda: os.environ[HOST_ENV]
from runner.cli import main
sys.exit(main())
"""


def readme_worker_command() -> list:
    """README "AutoML across machines": the worker command line every machine runs (tests/test_docs.py counts
    that subsection as run here), as argv."""
    from tests.test_docs import blocks

    block, = [b for b in blocks(REPO / "README.md") if b.heading == "AutoML across machines" and b.kind == "shell"]
    assert block.covered_by == "tests/test_automl_postgres.py", block.where
    lines = [line for line in block.text.replace("\\\n", " ").splitlines() if line.strip()]
    assert lines[0] == "export PGPASSWORD=...", lines  # the password outside the URL, as the text says
    argv, = [shlex.split(line) for line in lines[1:]]
    assert argv[:3] == ["skillbank", "automl", "worker"], argv
    return argv


def _worker(folder: Path, spec_file: Path, study: str, url: str, gate: Path, host: str = "") -> subprocess.Popen:
    script = folder / "skillbank_worker.py"
    if not script.is_file():
        script.write_text(WORKER_SCRIPT.format(tests=str(REPO / "tests")))
    env = dict(os.environ, PYTHONPATH=str(REPO), **{GATE_ENV: str(gate), HOST_ENV: host})
    # README's command with this test's study, server and spec in place of its placeholders
    values = {"--study": study, "--storage": url, "-e": str(spec_file)}
    argv = readme_worker_command()
    assert sorted(argv[3::2]) == sorted(values) and len(argv) == 3 + 2 * len(values), argv
    command = [sys.executable, str(script), *argv[1:3]]
    for flag in argv[3::2]:
        command += [flag, values[flag]]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _runs(results: Path) -> dict:
    """{trial folder name: [pid of each process that ran it]}."""
    return {runs.parent.name: [int(line) for line in runs.read_text().split()] for runs in results.glob("*/runs")}


def _wait_for_trials(results: Path, workers: list, count: int, seconds: float = 60) -> dict:
    """Wait until `count` trials have started, one per worker; returns {pid: trial folder name}."""
    deadline = time.monotonic() + seconds
    while True:
        running = {pids[0]: name for name, pids in _runs(results).items()}
        if len(running) >= count:
            return running
        for worker in workers:
            if worker.poll() is not None:
                raise AssertionError(f"worker exited ({worker.returncode}) early:\n{worker.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} trials did not start in {seconds} s: {running}")
        time.sleep(0.05)


def test_three_workers_share_a_postgres_study_and_a_killed_workers_trial_is_retried(postgres, pg_database,
                                                                                       tmp_path):
    results = tmp_path / "results"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_spec(results, max_trials=6)))
    gate = tmp_path / "gate"
    url = postgres.url(pg_database)
    # one worker has the password in its URL (printed redacted); the others read PGPASSWORD
    first = _worker(tmp_path, spec_file, "pg", postgres.url(pg_database, with_password=True), gate)
    second = _worker(tmp_path, spec_file, "pg", url, gate)
    victim = _worker(tmp_path, spec_file, "pg", url, gate, host=OTHER_HOST)
    try:
        # every worker holds one trial at the gate; the victim dies in the middle of its trial
        started = _wait_for_trials(results, [first, second, victim], count=3)
        victim_trial = int(started[victim.pid].removeprefix("trial_"))
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        time.sleep(GRACE + HEARTBEAT)  # its heartbeat goes stale
        study = optuna.load_study(study_name="pg", storage=url)
        assert study.trials[victim_trial].state == TrialState.RUNNING  # nothing could tell it died before that
        gate.touch()
        outputs = [worker.communicate(timeout=60)[0] for worker in (first, second)]
    finally:
        for worker in (first, second, victim):
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for worker, output in zip((first, second), outputs):
        assert worker.returncode == 0, output
        assert postgres.password not in output
    assert any(f"trial {victim_trial} was left running by a dead process" in out for out in outputs), outputs
    assert "postgresql://postgres:***@/" in outputs[0]

    trials = optuna.load_study(study_name="pg", storage=url).trials
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    refused = [t for t in trials if t.user_attrs.get(SURPLUS_ATTR)]  # asked when the budget was full; never ran
    others = [t for t in trials if t not in completed and t not in refused]
    assert len(completed) == 6
    # the only other trial is the victim's: failed by its stale heartbeat (its owner is on "another machine")
    assert [(t.number, t.state) for t in others] == [(victim_trial, TrialState.FAIL)]
    assert others[0].user_attrs[OWNER_ATTR] == {"host": OTHER_HOST, "pid": victim.pid}
    retries = [t for t in completed if t.system_attrs.get("failed_trial") == victim_trial]
    assert len(retries) == 1 and retries[0].params == others[0].params
    # nothing duplicated or lost: six different parameter sets, each trial run once, by the live workers
    assert len({tuple(sorted(t.params.items())) for t in completed}) == 6
    runs = _runs(results)
    assert all(runs[f"trial_{t.number}"] == [t.user_attrs[OWNER_ATTR]["pid"]] for t in completed)
    assert {t.user_attrs[OWNER_ATTR]["pid"] for t in completed} == {first.pid, second.pid}
    assert runs[f"trial_{victim_trial}"] == [victim.pid]

    best = max(completed, key=lambda t: (t.value, -t.number))
    info = json.loads((results / "best_model" / "best_automl.json").read_text())
    assert info["trial"] == best.number and info["value"] == pytest.approx(best.value)
    assert info["params"] == best.user_attrs[PARAMS_ATTR] and info["checkpoint"] == CHECKPOINT
    assert (results / "best_model" / CHECKPOINT).read_bytes() == f"weights of trial {best.number}".encode()


def test_a_worker_stays_for_a_dead_workers_last_trial_and_runs_it_again(postgres, pg_database, tmp_path):
    """The budget is taken while another machine's worker dies in its trial: the live worker waits for that trial
    to go stale and runs its parameters, instead of leaving the study one trial short."""
    results = tmp_path / "results"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_spec(results, max_trials=2)))
    gate = tmp_path / "gate"
    url = postgres.url(pg_database)
    survivor = _worker(tmp_path, spec_file, "last", url, gate)
    victim = _worker(tmp_path, spec_file, "last", url, gate, host=OTHER_HOST)
    try:
        started = _wait_for_trials(results, [survivor, victim], count=2)
        victim_trial = int(started[victim.pid].removeprefix("trial_"))
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        gate.touch()
        output = survivor.communicate(timeout=60)[0]
    finally:
        for worker in (survivor, victim):
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert survivor.returncode == 0, output
    assert f"waiting for trial(s) {victim_trial} of other workers" in output, output
    trials = optuna.load_study(study_name="last", storage=url).trials
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(completed) == 2 and {t.user_attrs[OWNER_ATTR]["pid"] for t in completed} == {survivor.pid}
    victims = [t for t in trials if t.number == victim_trial]
    assert victims[0].state == TrialState.FAIL
    assert [t.params for t in completed if t.system_attrs.get("failed_trial") == victim_trial] == [victims[0].params]


def test_workers_racing_to_create_a_new_postgres_study_all_open_it(postgres, pg_database):
    """Workers started together on an empty database race to create Optuna's tables (PostgreSQL answers the
    loser with DuplicateTable); each must end up with the study."""
    code = ("import sys; from runner.automl.study import open_storage, open_study; "
            "open_study(open_storage(sys.argv[1]), 's', 'tpe', 0, 2)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    openers = [subprocess.Popen([sys.executable, "-c", code, postgres.url(pg_database)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    for opener in openers:
        output = opener.communicate(timeout=60)[0]
        assert opener.returncode == 0, output
    assert [s.study_name for s in optuna.get_all_study_summaries(postgres.url(pg_database))] == ["s"]


# ------------------------------------------------------------------------------------------------ asha
def test_asha_prunes_a_forced_bad_trial(tmp_path):
    results = tmp_path / "results"
    seeded = optuna.create_study(study_name="s", storage=storage_url(None, results), direction="maximize")
    seeded.enqueue_trial({"train.optim.lr": 1e-4, "train.optim.weight_decay": 1e-4})  # the best possible
    seeded.enqueue_trial({"train.optim.lr": 1e-5, "train.optim.weight_decay": 1e-4})  # forced bad

    study = run_automl(_spec(results, algorithm="asha", max_trials=3), run_trial=cheap_trial, study_name="s")

    assert isinstance(study.pruner, optuna.pruners.SuccessiveHalvingPruner)
    good, bad = study.trials[:2]
    assert good.state == TrialState.COMPLETE
    assert bad.state == TrialState.PRUNED and bad.last_step == 1  # below the best third at rung 0 (epoch 1)
    assert json.loads((results / "best_model" / "best_automl.json").read_text())["trial"] == 0
    assert "| 1 | PRUNED |" in (results / "automl_report.md").read_text()
