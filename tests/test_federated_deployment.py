"""Deployment: a SuperLink and two SuperNodes (one site each) on 127.0.0.1 run the App with `flwr run`.

The run's real outcome is read with `flwr ls` (`flwr run` exits 0 even when the ServerApp fails), and
`flwr run` works on a copy of the app folder in tmp, since it rewrites pyproject.toml and installs a copy.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from test_federated import make_data, tiny_config

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_for_port(port, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


@pytest.fixture
def federation(tmp_path):
    """SuperLink + SuperNodes for liver and spleen, each in its own process group, all stopped at the end."""
    cases = make_data(tmp_path / "data")
    cases.to_csv(tmp_path / "cases.csv", index=False)
    cfg = tiny_config(tmp_path / "data")
    cfg.pop("data_root")
    cfg["data"] = {"source": "real"}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(REPO / "pyproject.toml", app / "pyproject.toml")  # the App is installed; fedseg from the venv
    home = tmp_path / "flwr-home"
    home.mkdir()
    link_port, *node_ports = free_ports(3)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FEDSEG_CACHE": str(tmp_path / "cache"),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    commands = {"superlink": [BIN / "flower-superlink", "--insecure", "--port", str(link_port),
                              "--database", str(tmp_path / "link.db")]}
    for dataset, port in zip(("liver", "spleen"), node_ports):
        commands[dataset] = [BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                             "--port", str(port),
                             "--node-config", f'dataset="{dataset}" data-root="{tmp_path / "data"}"']
    processes = {}
    try:
        for name, command in commands.items():
            log = open(tmp_path / f"{name}.log", "w")
            processes[name] = subprocess.Popen([str(c) for c in command], env=env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True)
            if name == "superlink":
                wait_for_port(link_port)
        yield {"root": tmp_path, "app": app, "env": env, "pyproject": (app / "pyproject.toml").read_text()}
    finally:
        for process in processes.values():  # each group holds a node and the superexec/app processes it spawned
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        time.sleep(2)
        for process in processes.values():  # leftovers of a group (e.g. a superexec) are ended too
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def flwr_run(federation, run_dir, cases, timeout=540):
    """`flwr run <copy of the app> loopback --stream` with the study's run_config; returns (run id, output)."""
    root = federation["root"]
    run_config = (f'profile="{root / "tiny.yaml"}" run-dir="{run_dir}" data-root="{root / "data"}" '
                  f'cases="{cases}" min-clients=2')
    done = subprocess.run([str(BIN / "flwr"), "run", str(federation["app"]), "loopback", "--stream",
                           "--run-config", run_config], env=federation["env"], capture_output=True, text=True,
                          timeout=timeout, cwd=root)
    output = done.stdout + done.stderr
    found = re.search(r"Successfully started run (\d+)", output)
    assert found, output
    return found.group(1), output


def run_status(federation, run_id):
    """The run's real status from the SuperLink (`flwr run` exits 0 even when the ServerApp failed)."""
    done = subprocess.run([str(BIN / "flwr"), "ls", "loopback", "--run-id", run_id, "--format", "json"],
                          env=federation["env"], capture_output=True, text=True, timeout=60,
                          cwd=federation["root"])
    runs = json.loads(done.stdout)["runs"]
    return runs[0]["status"], runs[0].get("status-details", "")


def test_two_sites_federate_with_flwr_run_and_a_failing_site_fails_the_run(federation):
    root = federation["root"]
    run_dir = root / "run"
    run_id, output = flwr_run(federation, run_dir, root / "cases.csv")
    status, details = run_status(federation, run_id)
    assert status == "finished:completed", (status, details, output[-3000:])
    table = pd.read_csv(run_dir / "metrics" / "fl_rounds.csv")
    assert len(table) == 2 * (2 + 2 + 1)
    assert sorted(table[table["kind"] == "train"]["dataset"]) == ["liver", "liver", "spleen", "spleen"]
    assert set(table[table["kind"] == "train"]["num_examples"]) == {2}
    best = torch.load(run_dir / "checkpoints" / "fl-global" / "best.pt", weights_only=False)
    assert set(best) == {"model", "step", "val_mean_dice"}
    for dataset in ("liver", "spleen"):
        assert (run_dir / "checkpoints" / f"fl-local-{dataset}" / "best.pt").exists()
    assert json.loads((run_dir / "fl" / "summary.json").read_text())["num_rounds"] == 2
    assert (root / "app" / "pyproject.toml").read_text() == federation["pyproject"]  # flwr run left it alone

    broken = pd.read_csv(root / "cases.csv")
    broken.loc[broken["dataset"] == "spleen", "label"] = "labelsTr/absent.nii.gz"
    broken.to_csv(root / "broken.csv", index=False)
    run_id, output = flwr_run(federation, root / "run-broken", root / "broken.csv")
    status, details = run_status(federation, run_id)
    assert status == "finished:failed", (status, details)
    assert "spleen" in details and "absent.nii.gz" in details, details
    assert not (root / "run-broken" / "fl" / "summary.json").exists()
