"""Multi-node training for real, on loopback: README's "Multi-node training" commands start two one-process "nodes"
(NODE_RANK 0 and 1 meeting at MASTER_ADDR:MASTER_PORT over gloo), and the run must equal a one-node run with
`train.num_gpus=2` (two processes) and the same seed, tensor for tensor, with node 0 alone writing results.

The README block is taken from README.md and its commands run as written, except the port (a free one instead of
29500) and where: each NODE_RANK line runs in its own folder, which stands for that node's disk (both hold spec.yaml,
as every node needs the spec), so the test also sees that node 1 writes nothing. How node-rank mistakes are refused
is checked on train.py's check_nodes directly (no training).
"""
from __future__ import annotations

import copy
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_docs import blocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION, HEADING = "Scaling out", "Multi-node training"
README_PORT = "MASTER_PORT=29500"
VENV_BIN = Path(sys.executable).parent
# Set by launchers; one left over in the test's own environment would change how Lightning places the processes.
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                      "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_NODEID", "SLURM_PROCID", "LSB_JOBID")


def _readme_block() -> str:
    """The one block of "### Multi-node training" (tests/test_docs.py counts that subsection as run here)."""
    runnable = [b for b in blocks(README) if b.section == SECTION and b.heading == HEADING and b.kind is not None
                and b.not_run is None]
    assert len(runnable) == 1 and runnable[0].covered_by == Path(__file__).relative_to(ROOT).as_posix(), (
        f"README.md '### {HEADING}': this file runs exactly one block there; found {[b.where for b in runnable]}. "
        "Mark the others <!-- not-run: reason --> or run them in a test")
    return runnable[0].text


def _node_commands(block: str, port: int) -> dict[int, str]:
    """{node rank: the shell text that node runs}: the block's export line, then the node's own line."""
    lines = [line for line in block.splitlines() if line.strip()]
    exports = [line for line in lines if line.startswith("export ")]
    nodes = {int(m.group(1)): line.rstrip(" &") for line in lines if (m := re.match(r"NODE_RANK=(\d+) ", line))}
    rest = [line for line in lines if line not in exports and not line.startswith("NODE_RANK=")]
    assert len(exports) == 1 and README_PORT in exports[0] and "MASTER_ADDR=127.0.0.1" in exports[0], exports
    assert sorted(nodes) == [0, 1] and all(line.startswith("wait") for line in rest), lines
    assert all("train.num_nodes=2 train.num_gpus=1" in line for line in nodes.values()), nodes
    export = exports[0].replace(README_PORT, f"MASTER_PORT={port}")
    return {rank: f"{export}\n{line}\n" for rank, line in nodes.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    # one thread per process: four processes share two cores, and the thread count is part of what makes float
    # results reproducible
    return dict(env, PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1", PYTHONHASHSEED="0")


def _start(command: list[str], folder: Path) -> subprocess.Popen:
    # a session of its own: on failure the whole process group (bash, the CLI, Lightning's ranks) is killed
    with open(folder.parent / f"{folder.name}.log", "wb") as log:
        return subprocess.Popen(command, cwd=folder, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _same(expected, got, where: str = "") -> None:
    """Exactly equal nested checkpoint parts: gloo sums two ranks' gradients in both runs, so nothing may differ."""
    import torch

    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(expected, got), where
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and expected.keys() == got.keys(), where
        for key in expected:
            _same(expected[key], got[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(expected) == len(got), where
        for i, (a, b) in enumerate(zip(expected, got)):
            _same(a, b, f"{where}[{i}]")
    else:
        assert expected == got, where


def test_two_nodes_on_loopback_equal_one_node_with_two_processes(tiny_train_spec, tmp_path):
    # 8 images, 2 processes x batch 2 -> 2 steps per epoch; 2 epochs give a loss curve of two points
    spec = copy.deepcopy(tiny_train_spec)
    spec.pop("_paths")
    spec["results_dir"] = "runs/spec"
    spec["model"].update(enc_layers=1, dec_layers=1)
    spec["dataset"]["batch_size"] = 2
    spec["train"].update(num_epochs=2, checkpoint_interval=2)
    folders = {name: tmp_path / name for name in ("node0", "node1", "one_node")}
    for folder in folders.values():
        folder.mkdir()
        (folder / "spec.yaml").write_text(yaml.safe_dump(spec))

    commands = _node_commands(_readme_block(), _free_port())
    processes = {
        "one_node": _start([str(VENV_BIN / "grounding_dino"), "train", "-e", "spec.yaml", "train.num_gpus=2",
                            "results_dir=runs/one_node"], folders["one_node"]),
        **{f"node{rank}": _start(["bash", "-euo", "pipefail", "-c", text], folders[f"node{rank}"])
           for rank, text in commands.items()},
    }
    try:
        for name, process in processes.items():
            code = process.wait(timeout=600)
            assert code == 0, f"{name} exited {code}:\n" + (tmp_path / f"{name}.log").read_text()[-4000:]
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    nodes_log = (tmp_path / "node0.log").read_text() + (tmp_path / "node1.log").read_text()
    for rank in (0, 1):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in nodes_log
    assert "distributed_backend=gloo" in nodes_log
    assert "MEMBER: 2/2" in (tmp_path / "one_node.log").read_text()

    # node 1 wrote nothing on its "disk"; node 0 wrote one set of results, as the one-node run did
    assert sorted(p.name for p in folders["node1"].iterdir()) == ["spec.yaml"]
    two_nodes = folders["node0"] / "runs" / "two_nodes" / "train"
    one_node = folders["one_node"] / "runs" / "one_node" / "train"
    for results in (two_nodes, one_node):
        assert sorted(p.name for p in results.glob("*.pth")) == ["gdino_model_latest.pth",
                                                                 "model_epoch_001_step_00004.pth"]
        assert os.readlink(results / "gdino_model_latest.pth") == "model_epoch_001_step_00004.pth"
        assert (results / "experiment.yaml").is_file()

    from grounding_dino.status import read_status

    lines = {results: read_status(results / "status.json") for results in (two_nodes, one_node)}
    assert [r["status"] for r in lines[two_nodes]] == ["STARTED", "RUNNING", "RUNNING", "SUCCESS"]  # rank 0 only
    curve = {results: [(r["epoch"], r["step"], r["kpi"]) for r in lines[results] if r["status"] == "RUNNING"]
             for results in lines}
    assert curve[two_nodes] == curve[one_node]
    assert all({"train_loss", "val_loss", "val_mAP"} <= set(kpi) for *_, kpi in curve[two_nodes])

    import torch

    got = torch.load(two_nodes / "gdino_model_latest.pth", weights_only=True)
    expected = torch.load(one_node / "gdino_model_latest.pth", weights_only=True)
    assert got["global_step"] == expected["global_step"] == 4
    # every parameter took all four optimizer steps
    assert {int(s["step"]) for s in got["optimizer_states"][0]["state"].values()} == {4}
    _same(expected["state_dict"], got["state_dict"], "state_dict")
    _same(expected["optimizer_states"], got["optimizer_states"], "optimizer_states")


NODE_CASES = [
    # (environment, train.num_nodes, a fragment of the refusal or None)
    ({}, 1, None),
    ({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "NODE_RANK": "1"}, 2, None),
    ({"NODE_RANK": "1"}, 1, "NODE_RANK=1 but train.num_nodes is 1"),
    ({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "NODE_RANK": "2"}, 2, "node ranks run 0..1"),
    ({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "NODE_RANK": "one"}, 2, "NODE_RANK='one' is not a node"),
    ({}, 2, "MASTER_ADDR, MASTER_PORT, NODE_RANK are not set"),
    ({"MASTER_ADDR": "10.0.0.1", "NODE_RANK": "0"}, 2, "but MASTER_PORT is not set"),
    # torchrun: its own rendezvous, the node's rank in GROUP_RANK
    ({"TORCHELASTIC_RUN_ID": "x", "GROUP_RANK": "1", "RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, 2, None),
    ({"TORCHELASTIC_RUN_ID": "x", "GROUP_RANK": "1", "RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, 1,
     "GROUP_RANK=1 but train.num_nodes is 1"),
]


@pytest.mark.parametrize("env, num_nodes, refusal", NODE_CASES)
def test_node_rank_mistakes_are_refused_before_training(monkeypatch, env, num_nodes, refusal):
    from grounding_dino.actions.train import check_nodes
    from grounding_dino.config import TrainConfig
    from grounding_dino.errors import UserError

    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    train = TrainConfig(num_nodes=num_nodes)
    if refusal is None:
        check_nodes(train)
    else:
        with pytest.raises(UserError, match=re.escape(refusal)):
            check_nodes(train)


@pytest.mark.parametrize("node_rank", ["0", "1"])
def test_only_the_launching_node_takes_the_lock_and_writes_the_spec(monkeypatch, tmp_path, tiny_train_spec,
                                                                     node_rank):
    import grounding_dino.actions as actions
    from grounding_dino.layout import EXPERIMENT_FILE, RESULTS_LOCK

    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NODE_RANK", node_rank)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    seen = []
    # the action stands in for training: what matters is what run_action wrote before and around it
    monkeypatch.setattr(actions, "get_action", lambda name: lambda cfg, run: seen.append(sorted(
        p.name for p in run.results_dir.iterdir()) if run.results_dir.exists() else None))
    spec = copy.deepcopy(tiny_train_spec)
    spec.pop("_paths")
    spec["results_dir"] = str(tmp_path / "results")
    spec["train"]["num_nodes"] = 2
    assert actions.run_action("train", spec) == 0
    assert seen == [sorted([RESULTS_LOCK, EXPERIMENT_FILE]) if node_rank == "0" else None]
