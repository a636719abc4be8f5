"""Past one machine: two ``run.py`` processes joined as two nodes through torchrun's c10d rendezvous on
127.0.0.1, and SLURM through Hydra's submitit launcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from costlab import CONF_DIR, ROOT
from costlab.launcher.torchrun import from_slurm
from costlab.schema import ConfigError
from tests.conftest import TINY, compose_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two launchers and their torchruns, ~15 s: the default suite checks the nodes' parts in-process
@pytest.mark.e2e
def test_two_nodes_on_localhost_make_one_run_owned_by_node_0(cli, tmp_path):
    port = _free_port()
    common = [*TINY, "trainer.max_steps=6", "trainer.device=cpu", "parallelism=ddp", "trainer.nproc_per_node=1",
              "trainer.nnodes=2", f"trainer.rdzv_endpoint=127.0.0.1:{port}", "tracking.run_name=two-nodes",
              f"tracking.uri={cli.uri}"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}  # one machine without DNS: loopback for gloo
    before = len(cli.runs())
    # node 1 starts first: whichever agent hosts the rendezvous, global rank 0 must land on node 0
    procs = {
        node: subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), *common, f"trainer.node_rank={node}",
             f"hydra.run.dir={tmp_path}/node{node}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node in (1, 0)
    }
    out = {node: p.communicate(timeout=600) for node, p in procs.items()}
    for node, p in procs.items():
        assert p.returncode == 0, (node, out[node][0][-2000:], out[node][1][-3000:])

    runs = cli.runs()
    assert len(runs) == before + 1, "only node 0 opens an MLflow run"
    run = cli.run_by_name("two-nodes")
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2"
    assert len(cli.loss_curve(run.info.run_id)) == 6
    assert "mem/peak_bytes" in run.data.metrics and "eval/loss" in run.data.metrics
    # rank 0 (evaluation, the saved model) ran on node 0; node 1 kept only its config and log
    assert (tmp_path / "node0" / "model.pt").exists()
    node1 = {p.name for p in (tmp_path / "node1").iterdir()}
    assert {"config.node1.yaml", "worker.node1.log", "job_status.node1"} <= node1, node1
    assert not {"config.yaml", "model.pt", "job_status"} & node1, node1
    # the follower opens no MLflow run: its status file is its report to a sweep's parent
    assert json.loads((tmp_path / "node1" / "job_status.node1").read_text())["status"] == "FINISHED"
    assert json.loads((tmp_path / "node0" / "job_status").read_text())["status"] == "FINISHED"
    assert OmegaConf.load(tmp_path / "node1" / "config.node1.yaml").runtime.run_id is None
    assert "costlab: node 1 FINISHED" in out[1][1]


def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'costlab[slurm]'")
    from hydra import compose, initialize_config_dir

    overrides = ["hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1",
                 "hydra.launcher.gpus_per_node=8", "hydra.launcher.timeout_min=60", "trainer.nnodes=2",
                 "trainer.nproc_per_node=8", "parallelism=fsdp", "trainer.device=cuda"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 1, 8)
    assert cfg.trainer.nnodes == 2 and cfg.parallelism.name == "fsdp"


SLURM_TASK = {"SLURM_JOB_ID": "4242", "SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2",
              "SLURM_JOB_NODELIST": "gpu[003-004]"}  # what SLURM sets in the task of node 1 of a 2-node job


def _in_slurm_task(monkeypatch, **env: str) -> None:
    pytest.importorskip("submitit", reason="pip install 'costlab[slurm]'")
    for key, value in {**SLURM_TASK, **env}.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize(("nodelist", "host"), [
    ("gpu017", "gpu017"), ("a1,a2", "a1"), ("gpu[003-004,007]", "gpu003"), ("gpu[12,14],cpu1", "gpu12"),
    ("rack-2-[08-09]", "rack-2-08"),
])
def test_node_0_is_the_first_host_of_the_slurm_node_list(monkeypatch, nodelist, host):
    _in_slurm_task(monkeypatch, SLURM_JOB_NODELIST=nodelist)
    cfg = compose_config(["trainer.nnodes=2", "parallelism=ddp"])
    from_slurm(cfg)
    assert cfg.trainer.rdzv_endpoint == f"{host}:24242"


def test_each_slurm_task_takes_its_node_rank_and_node_0s_endpoint(monkeypatch):
    _in_slurm_task(monkeypatch)
    cfg = compose_config(["trainer.nnodes=2", "parallelism=ddp"])
    from_slurm(cfg)
    t = cfg.trainer
    assert (t.node_rank, t.rdzv_endpoint, t.rdzv_id) == (1, "gpu003:24242", "costlab-4242")

    single = compose_config()
    from_slurm(single)  # one node: nothing to coordinate, the config is left alone
    assert single.trainer.node_rank == 0 and single.trainer.rdzv_endpoint is None

    wrong = compose_config(["trainer.nnodes=3", "trainer.rdzv_endpoint=h:1"])
    with pytest.raises(ConfigError, match="trainer.nnodes=3"):
        from_slurm(wrong)


def test_a_task_of_a_slurm_job_array_rendezvous_on_its_own_port(monkeypatch):
    # each task of an array has its own SLURM_JOB_ID; the array's id is shared by all of them
    _in_slurm_task(monkeypatch, SLURM_JOB_ID="4243", SLURM_ARRAY_JOB_ID="4242", SLURM_ARRAY_TASK_ID="1")
    cfg = compose_config(["trainer.nnodes=2", "parallelism=ddp"])
    from_slurm(cfg)
    assert (cfg.trainer.rdzv_endpoint, cfg.trainer.rdzv_id) == ("gpu003:24243", "costlab-4243")


def test_an_unreadable_slurm_node_list_asks_for_the_endpoint(monkeypatch):
    _in_slurm_task(monkeypatch, SLURM_JOB_NODELIST="gpu[003-004")
    with pytest.raises(ConfigError, match="trainer.rdzv_endpoint"):
        from_slurm(compose_config(["trainer.nnodes=2", "parallelism=ddp"]))
