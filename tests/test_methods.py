"""A federated method is one object (`fedseg.federated.methods`): the ClientApp, the ServerApp and the settings ask
it, so adding one is one module and one registry line (docs/methods.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedseg.federated import methods, settings
from fedseg.federated.strategies import StudyFedAvg, StudyOwnerFedAvg, StudySegViz

TESTS = Path(__file__).resolve().parent

#: The example of docs/methods.md, in a fresh interpreter: a toy method (an L2 penalty on the logits) declared in one
#: class and registered, then one round of the real ClientApp's train handler on tiny data, and the server's choices.
ADD_A_METHOD = """
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, {tests!r})

from fedseg.federated import methods
from fedseg.federated.methods.base import Method
from fedseg.train.training import LocalHooks

seen = []


class Damped(Method):
    name = "damped"
    summary = "FedAvg with an L2 penalty on the logits in local training"
    knobs = {{"damping": 0.1}}

    def resolve_knobs(self, fl):
        fl["damping"] = float(fl["damping"])

    def hooks(self, local):
        weight = local.cfg["federated"]["damping"]

        def term(model, logits, batch):
            seen.append((local.client, local.server_round, weight))
            return weight * logits.pow(2).mean()

        return LocalHooks(extra_loss=term)


methods.register(Damped())  # inside the package: one line in methods._BUILT_IN

from fedseg.federated import client_app, settings
from helpers import client_context, client_message, federation_config, make_data

root = Path(tempfile.mkdtemp())
cases = make_data(root / "data")
cfg = federation_config(root / "data")
cfg["federated"]["method"] = "damped"
context = client_context(cfg, root / "run", cases, {{"partition-id": 0, "num-partitions": 2}})
context.run_config["damping"] = 0.5  # a method's own knob, spelled as flwr run --run-config spells it
message, _ = client_message(cfg, "train")
reply = client_app.app(message, context)
resolved = settings.study_config(context.run_config)
print(json.dumps({{
    "error": reply.error.reason if reply.has_error() else None,
    "loss": reply.content["metrics"]["train-loss"] if not reply.has_error() else None,
    "seen": seen, "fl": {{k: resolved["federated"][k] for k in ("method", "damping", "mu")}},
    "keys": settings.run_config_keys({{"damping": 0.2, "mu": 0.3}}),
    "strategy": methods.get("damped").strategy.__name__, "names": list(methods.REGISTRY),
}}))
"""


def test_adding_a_method_is_one_object_and_one_registry_line(tmp_path):
    """The toy method of docs/methods.md, added in a fresh interpreter: its knob is accepted from the profile and the
    run config, its hook reaches the real ClientApp's local training at every step, and the server aggregates with
    the strategy it names."""
    done = subprocess.run([sys.executable, "-c", ADD_A_METHOD.format(tests=str(TESTS))], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["error"] is None and out["loss"] > 0
    assert out["seen"] == [["liver", 1, 0.5]] * 2  # every local step (local_steps 2) of round 1, weight from run config
    assert out["fl"] == {"method": "damped", "damping": 0.5, "mu": 0.01}
    assert out["keys"] == {"damping": 0.2, "mu": 0.3}
    assert out["strategy"] == "StudyFedAvg" and out["names"][-1] == "damped"


def test_each_built_in_method_says_its_strategy_knobs_and_network():
    assert methods.METHODS == ("fedavg", "ownerfedavg", "fedprox", "segviz", "fedgin", "distill", "pseudo")
    strategies = {name: methods.get(name).strategy for name in methods.METHODS}
    assert strategies == {"fedavg": StudyFedAvg, "ownerfedavg": StudyOwnerFedAvg, "fedprox": StudyFedAvg,
                          "segviz": StudySegViz, "fedgin": StudyFedAvg, "distill": StudyFedAvg, "pseudo": StudyFedAvg}
    assert methods.knob_defaults() == {"mu": 0.01, "distill_weight": 1.0, "pseudo_after": None}
    model = {"name": "UNet", "channels": [8, 16], "strides": [2], "num_res_units": 0}
    assert [name for name in methods.METHODS if methods.get(name).network(model, ["liver"]) != model] == ["segviz"]
    fl = settings.federated_settings({"train": {"steps": 8}, "federated": {"rounds": 4}})
    assert (fl["mu"], fl["distill_weight"], fl["pseudo_after"]) == (0.01, 1.0, 2)  # pseudo: half the rounds


def test_an_unknown_or_taken_method_name_is_refused():
    with pytest.raises(ValueError, match="federated.method='fedsgd': use one of fedavg, ownerfedavg"):
        methods.get("fedsgd")
    with pytest.raises(ValueError, match="'fedavg' is taken"):
        methods.register(methods.fedavg.FedAvg())
    with pytest.raises(ValueError, match="Not a federation setting: damping"):
        settings.run_config_keys({"damping": 0.1})
