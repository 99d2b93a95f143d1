"""Deployment: a SuperLink and two SuperNodes (one site each) on 127.0.0.1 run the App with `flwr run`.

As the README's "Across sites" section tells users to run it: TLS (a self-signed CA and a server certificate for
127.0.0.1, made with openssl) and SuperNode authentication (one ssh-keygen ECDSA key pair per SuperNode, each public
key registered with `flwr supernode register` before its SuperNode starts); a SuperNode with an unregistered key is
refused. The run's real outcome is read with `flwr ls` (`flwr run` exits 0 even when the ServerApp fails), and
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


def make_tls(folder, keys):
    """Self-signed CA, a server certificate for IP:127.0.0.1/DNS:localhost, and an ECDSA key pair per name in keys."""
    folder.mkdir()

    def call(*command):
        subprocess.run(command, cwd=folder, check=True, capture_output=True, timeout=60)

    call("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
         "-days", "2", "-subj", "/CN=fedseg-test-ca")
    call("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    call("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    for key in keys:
        call("ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", f"{key}_key")
    return folder


def flwr_json(env, cwd, *arguments, timeout=60):
    """`flwr <arguments> --format json`, parsed (a failed command exits 0 too, with "success": false)."""
    done = subprocess.run([str(BIN / "flwr"), *arguments, "--format", "json"], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"success": False, "error-message": done.stdout + done.stderr}


def register_supernode(env, cwd, public_key, connection, seconds=60):
    """`flwr supernode register <key>.pub <connection>`, retried while the SuperLink is still starting; the node id."""
    deadline = time.time() + seconds
    while True:
        answer = flwr_json(env, cwd, "supernode", "register", str(public_key), connection)
        if answer.get("success"):
            return str(answer["node-id"])
        if time.time() > deadline:
            raise RuntimeError(f"registering {public_key} failed: {answer}")
        time.sleep(2)


@pytest.fixture
def federation(tmp_path):
    """TLS SuperLink with SuperNode authentication + SuperNodes for liver and spleen with registered keys, and one
    SuperNode with an unregistered key ("rogue"); each in its own process group, all stopped at the end."""
    missing = [tool for tool in ("openssl", "ssh-keygen") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found: needed for the TLS certificates and SuperNode keys")
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
    datasets = ("liver", "spleen")
    tls = make_tls(tmp_path / "tls", (*datasets, "rogue"))  # the rogue key is never registered
    connection = "loopback-tls"
    link_port, *node_ports = free_ports(4)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\n'
                                      f'address = "127.0.0.1:{link_port}"\n'
                                      f'root-certificates = "{tls / "ca.crt"}"\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FEDSEG_CACHE": str(tmp_path / "cache"),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    link = [BIN / "flower-superlink", "--port", str(link_port), "--ssl-ca-certfile", tls / "ca.crt",
            "--ssl-certfile", tls / "server.pem", "--ssl-keyfile", tls / "server.key", "--enable-supernode-auth",
            "--database", tmp_path / "link.db"]
    nodes = {}
    for name, port in zip((*datasets, "rogue"), node_ports):
        dataset = "liver" if name == "rogue" else name
        nodes[name] = [BIN / "flower-supernode", "--root-certificates", tls / "ca.crt",
                       "--superlink", f"127.0.0.1:{link_port}", "--auth-supernode-private-key", tls / f"{name}_key",
                       "--port", str(port),
                       "--node-config", f'dataset="{dataset}" data-root="{tmp_path / "data"}"']
    processes = {}

    def start(name, command):
        log = open(tmp_path / f"{name}.log", "w")
        processes[name] = subprocess.Popen([str(c) for c in command], env=env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        log.close()  # the child holds its own copy

    try:
        start("superlink", link)
        wait_for_port(link_port)
        node_ids = {dataset: register_supernode(env, tmp_path, tls / f"{dataset}_key.pub", connection)
                    for dataset in datasets}  # registered before the SuperNodes start
        for name, command in nodes.items():
            start(name, command)
        yield {"root": tmp_path, "app": app, "env": env, "pyproject": (app / "pyproject.toml").read_text(),
               "connection": connection, "node_ids": node_ids, "rogue": processes["rogue"]}
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
    """`flwr run <copy of the app> loopback-tls --stream` with the study's run_config; returns (run id, output)."""
    root = federation["root"]
    run_config = (f'profile="{root / "tiny.yaml"}" run-dir="{run_dir}" data-root="{root / "data"}" '
                  f'cases="{cases}" min-clients=2')
    done = subprocess.run([str(BIN / "flwr"), "run", str(federation["app"]), federation["connection"], "--stream",
                           "--run-config", run_config], env=federation["env"], capture_output=True, text=True,
                          timeout=timeout, cwd=root)
    output = done.stdout + done.stderr
    found = re.search(r"Successfully started run (\d+)", output)
    assert found, output
    return found.group(1), output


def run_status(federation, run_id):
    """The run's real status from the SuperLink (`flwr run` exits 0 even when the ServerApp failed)."""
    answer = flwr_json(federation["env"], federation["root"], "ls", federation["connection"], "--run-id", run_id)
    assert answer.get("success"), answer
    runs = answer["runs"]
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
    assert set(best) == {"model", "step", "val_mean_dice", "settings"}
    for dataset in ("liver", "spleen"):
        assert (run_dir / "checkpoints" / f"fl-local-{dataset}" / "best.pt").exists()
    assert json.loads((run_dir / "fl" / "summary.json").read_text())["num_rounds"] == 2
    assert (root / "app" / "pyproject.toml").read_text() == federation["pyproject"]  # flwr run left it alone

    # the SuperNode with an unregistered key was refused; only the two registered SuperNodes are online
    rogue = federation["rogue"]
    assert rogue.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in (root / "rogue.log").read_text()
    answer = flwr_json(federation["env"], root, "supernode", "ls", federation["connection"])
    assert answer.get("success"), answer
    online = sorted(node["node-id"] for node in answer["nodes"] if node["status"] == "online")
    assert online == sorted(federation["node_ids"].values()), answer["nodes"]

    broken = pd.read_csv(root / "cases.csv")
    broken.loc[broken["dataset"] == "spleen", "label"] = "labelsTr/absent.nii.gz"
    broken.to_csv(root / "broken.csv", index=False)
    run_id, output = flwr_run(federation, root / "run-broken", root / "broken.csv")
    status, details = run_status(federation, run_id)
    assert status == "finished:failed", (status, details)
    assert "spleen" in details and "absent.nii.gz" in details, details
    assert not (root / "run-broken" / "fl" / "summary.json").exists()
