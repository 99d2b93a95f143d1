"""Deployment: a SuperLink and two SuperNodes (one site each) on 127.0.0.1 run the App with `flwr run`, with the
commands of the "Across sites" section of docs/deployment.md (linked from the README) as written there.

The commands are read from that page (`readme_command`) and only these are replaced, each checked to be there so
a changed page fails this test instead of drifting from it: the server's host name (server.example.org ->
127.0.0.1, with a certificate for IP:127.0.0.1), its port, the sites' key names, their node-config (dataset and
data root of the test's data) and an extra `--port` per SuperNode (several on one machine), the app folder, and
the run config. The environment is the venv's, as `source .venv/bin/activate` gives; nothing disables Flower's
dependency installation behind the page's back. TLS and SuperNode authentication: a SuperNode with an
unregistered key is refused. The run's real outcome is read with `flwr ls` (`flwr run` exits 0 even when the
ServerApp fails).
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
from helpers import federation_config, make_data

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
DEPLOYMENT = REPO / "docs" / "deployment.md"  # the README's deployment section, moved to its own page


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


def flwr_json(env, cwd, *arguments, timeout=60):
    """`flwr <arguments> --format json`, parsed (a failed command exits 0 too, with "success": false)."""
    done = subprocess.run([str(BIN / "flwr"), *arguments, "--format", "json"], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"success": False, "error-message": done.stdout + done.stderr}


def readme_command(program, replacements=()):
    """The one command of docs/deployment.md's deployment block that starts with `program` (continuation lines
    joined), with each (old, new) of `replacements` applied; an `old` the command does not hold fails the test."""
    text = DEPLOYMENT.read_text()
    section = text[text.index("## Across sites"):]
    block = section[section.index("```bash") + len("```bash"):]
    block = block[:block.index("```")].replace("\\\n", " ")
    found = [line.strip() for line in block.splitlines()
             if line.strip() and not line.strip().startswith("#") and line.strip().startswith(program + " ")]
    assert len(found) == 1, f"docs/deployment.md's deployment block has {len(found)} commands starting with {program}"
    command = re.sub(r" {2,}", " ", re.sub(r"\s+#\s.*$", "", found[0]))  # an inline comment ends it
    for old, new in replacements:
        assert old in command, f"{old!r} is not in docs/deployment.md's command {command!r}"
        command = command.replace(old, new)
    return command


@pytest.fixture
def federation(tmp_path):
    """TLS SuperLink with SuperNode authentication + SuperNodes for liver and spleen with registered keys, and one
    SuperNode with an unregistered key ("rogue"), all started with the README's commands; each in its own process
    group, all stopped at the end."""
    missing = [tool for tool in ("openssl", "ssh-keygen") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found: needed for the TLS certificates and SuperNode keys")
    cases = make_data(tmp_path / "data")
    cases.to_csv(tmp_path / "cases.csv", index=False)
    cfg = federation_config(tmp_path / "data")
    cfg.pop("data_root")
    cfg["data"] = {"source": "real"}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    home = tmp_path / "flwr-home"
    home.mkdir()
    datasets = ("liver", "spleen")
    tls = tmp_path / "tls"
    tls.mkdir()
    link_port, *node_ports = free_ports(4)
    host = [("server.example.org:8443", f"127.0.0.1:{link_port}")]
    env = {**os.environ, "FLWR_HOME": str(home), "FEDSEG_CACHE": str(tmp_path / "cache"),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)

    def shell(command, cwd=tls, timeout=60):
        done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, (command, done.stdout + done.stderr)
        return done

    # the server's certificates, for 127.0.0.1 instead of server.example.org
    certificate_commands = [line for line in DEPLOYMENT.read_text().split("## Across sites")[1]
                            .split("```")[1].splitlines() if line.startswith(("openssl", "echo"))]
    assert len(certificate_commands) == 4, certificate_commands
    for command in certificate_commands:
        command = command.replace("/CN=server.example.org", "/CN=127.0.0.1").replace(
            "subjectAltName=DNS:server.example.org", "subjectAltName=IP:127.0.0.1,DNS:localhost")
        assert "example.org" not in command, command
        shell(command)
    for name in (*datasets, "rogue"):  # the rogue key is never registered
        shell(readme_command("ssh-keygen", [("site_key", f"{name}_key")]))
    connection = "study"
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\n'
                                      f'address = "127.0.0.1:{link_port}"\n'
                                      f'root-certificates = "{tls / "ca.crt"}"\n')
    link = readme_command("flower-superlink", [("--host 0.0.0.0", "--host 127.0.0.1"),
                                               ("--port 8443", f"--port {link_port}")])
    nodes = {}
    for name, port in zip((*datasets, "rogue"), node_ports):
        dataset = "liver" if name == "rogue" else name
        nodes[name] = readme_command("flower-supernode", [
            *host, ("private-key site_key", f"private-key {name}_key"),
            ("""'dataset="liver" data-root="/data/fedseg" run-dir="/data/fedseg-runs/run1"'""",
             f"""'dataset="{dataset}" data-root="{tmp_path / "data"}"' --port {port}""")])
    processes = {}

    def start(name, command):
        log = open(tmp_path / f"{name}.log", "a")
        processes[name] = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=tls, env=env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        log.close()  # the child holds its own copy

    def register(name, seconds=60):
        """The README's `flwr supernode register`, retried while the SuperLink is still starting; the node id."""
        command = readme_command("flwr supernode register", [("site_key.pub", f"{name}_key.pub")])
        deadline = time.time() + seconds
        while True:
            done = subprocess.run(["bash", "-c", command + " --format json"], cwd=tls, env=env,
                                  capture_output=True, text=True, timeout=60)
            try:
                answer = json.loads(done.stdout)
            except json.JSONDecodeError:
                answer = {"success": False, "error-message": done.stdout + done.stderr}
            if answer.get("success"):
                return str(answer["node-id"])
            if time.time() > deadline:
                raise RuntimeError(f"registering {name} failed: {answer}")
            time.sleep(2)

    try:
        start("superlink", link)
        wait_for_port(link_port)
        node_ids = {dataset: register(dataset) for dataset in datasets}  # registered before the SuperNodes start
        for name, command in nodes.items():
            start(name, command)
        yield {"root": tmp_path, "app": tmp_path / "app", "env": env, "connection": connection,
               "node_ids": node_ids, "processes": processes, "restart": lambda name: start(name, nodes[name])}
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


def flwr_run(federation, run_dir, cases, extra="", timeout=540):
    """The README's `flwr run` (on a copy of pyproject.toml) with the test's run config; (run id, output)."""
    root = federation["root"]
    run_config = (f'profile="{root / "tiny.yaml"}" run-dir="{run_dir}" data-root="{root / "data"}" '
                  f'cases="{cases}" min-clients=2 {extra}').strip()
    command = readme_command("mkdir -p /tmp/fedseg-app", [
        ("/tmp/fedseg-app", str(federation["app"])),
        ("""'profile="paper" run-dir="/runs/fl1" rounds=60 clients="liver,pancreas,kits19,spleen"'""",
         f"'{run_config}'")])
    done = subprocess.run(["bash", "-c", command], env=federation["env"], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    output = done.stdout + done.stderr
    found = re.search(r"Successfully started run (\d+)", output)
    assert found, output
    return found.group(1), output


def run_status(federation, run_id):
    """The run's real status from the SuperLink, with the README's `flwr ls` (`flwr run` exits 0 even when the
    ServerApp failed)."""
    command = readme_command("flwr ls") + f" --run-id {run_id} --format json"
    done = subprocess.run(["bash", "-c", command], env=federation["env"], capture_output=True, text=True,
                          timeout=60, cwd=federation["root"])
    answer = json.loads(done.stdout)
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
    assert set(best) == {"model", "step", "val_mean_dice", "settings", "code", "federation_id"}
    for dataset in ("liver", "spleen"):
        assert (run_dir / "checkpoints" / f"fl-local-{dataset}" / "best.pt").exists()
    assert json.loads((run_dir / "fl" / "summary.json").read_text())["num_rounds"] == 2
    assert (root / "app" / "pyproject.toml").read_text() == (REPO / "pyproject.toml").read_text()  # left alone

    # the SuperNode with an unregistered key was refused; only the two registered SuperNodes are online
    rogue = federation["processes"]["rogue"]
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


def test_a_lost_site_is_named_a_missing_one_awaited_and_the_run_resumed_when_it_is_back(federation):
    """Issue: killing the spleen SuperNode in round 2 gave `node 1 (dataset unknown ...)`; a run waiting for sites
    said only how many were connected, and for ever; a failed run started again from round 1."""
    root = federation["root"]
    run_dir = root / "run-kill"
    processes = federation["processes"]
    run = {}

    def start_run():
        run["result"] = flwr_run(federation, run_dir, root / "cases.csv", "rounds=4")

    import threading

    thread = threading.Thread(target=start_run)
    thread.start()
    rounds = run_dir / "metrics" / "fl_rounds.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not (rounds.exists() and (pd.read_csv(rounds)["kind"] == "global").any()):
        time.sleep(0.5)
    assert rounds.exists(), "round 1 never finished"
    os.killpg(processes["spleen"].pid, signal.SIGKILL)  # the spleen site goes down in round 2
    processes["spleen"].wait(timeout=30)
    thread.join(timeout=600)
    run_id, output = run["result"]
    status, details = run_status(federation, run_id)
    assert status == "finished:failed", (status, details)
    print(f"killed spleen SuperNode -> {status}: {details}")  # shown with pytest -rA
    assert "client 'spleen'" in details and "dataset unknown" not in details, details
    reason = json.loads((run_dir / "fl" / "status.json").read_text())
    assert reason["status"] == "failed" and "client 'spleen'" in reason["reason"]
    finished_rounds = int(torch.load(run_dir / "fl" / "state.pt", weights_only=False)["round"])
    assert 1 <= finished_rounds < 4

    # while the spleen site is down, a run that needs it says so and gives up after wait-timeout
    run_id, output = flwr_run(federation, root / "run-wait", root / "cases.csv",
                              'clients="liver,spleen" wait-timeout=5')
    status, details = run_status(federation, run_id)
    assert status == "finished:failed", (status, details)
    print(f"waiting for the spleen site -> {status}: {details}")
    assert "1 of 2 sites connected (liver); missing: spleen" in details, details

    # the site is back: the same command continues the federation after its last finished round
    federation["restart"]("spleen")
    run_id, output = flwr_run(federation, run_dir, root / "cases.csv", "rounds=4")
    status, details = run_status(federation, run_id)
    assert status == "finished:completed", (status, details, output[-3000:])
    summary = json.loads((run_dir / "fl" / "summary.json").read_text())
    assert summary["resumed_after_round"] == finished_rounds and summary["num_rounds"] == 4
    table = pd.read_csv(rounds)
    assert sorted(table[table["kind"] == "global"]["round"]) == [1, 2, 3, 4]
    # and a finished federation is not replaced unless the run config says overwrite
    run_id, output = flwr_run(federation, run_dir, root / "cases.csv", "rounds=4")
    status, details = run_status(federation, run_id)
    assert status == "finished:failed" and "holds a finished federation" in details, (status, details)
