"""SegViz's node-set experiment: which model is scored on which organ, and the table's arithmetic."""

import json

import numpy as np
import pandas as pd
import pytest

from fedseg.experiments import nodes
from fedseg.published import KANHERE_NODES


def test_each_node_set_adds_the_papers_next_organ_and_is_scored_on_its_own_organs(tmp_path):
    models = nodes.table_models(tmp_path, (2, 3, 4))
    assert models[("single", nodes.SINGLE)] == {
        organ: tmp_path / "checkpoints" / f"sl-{d}" / "best.pt" for d, organ in nodes.ORGAN_OF.items()}
    assert set(models[("2-node", nodes.SEGVIZ)]) == {"liver", "spleen"}
    assert set(models[("3-node", nodes.CENTRAL)]) == {"liver", "spleen", "pancreas"}
    assert set(models[("4-node", nodes.CONVENTIONAL)]) == {"liver", "spleen", "pancreas", "kidney"}
    assert (models[("3-node", nodes.SEGVIZ)]["liver"]
            == tmp_path / "nodes-3" / "segviz" / "checkpoints" / "fl-global" / "best.pt")
    # 4 nodes = all four datasets: 02's central model, not a new one
    assert models[("4-node", nodes.CENTRAL)]["kidney"] == tmp_path / "checkpoints" / "central" / "best.pt"
    assert models[("2-node", nodes.CENTRAL)]["liver"] == tmp_path / "nodes-2" / "checkpoints" / "central" / "best.pt"
    with pytest.raises(ValueError, match="2-, 3- and 4-node"):
        nodes.check_nodes((5,))


def test_the_four_node_federation_of_a_finished_sweep_is_reused_and_an_unfinished_one_is_not(tmp_path):
    sweep = tmp_path / "fedavg"
    (sweep / "checkpoints" / "fl-global").mkdir(parents=True)
    (sweep / "checkpoints" / "fl-global" / "best.pt").write_bytes(b"")
    record = {"notebooks": {"03_federated_training": {"status": "failed"}}}
    (sweep / "run.json").write_text(json.dumps(record))
    assert nodes.federation_dir(tmp_path, 4, "fedavg") == tmp_path / "nodes-4" / "fedavg"
    record["notebooks"]["03_federated_training"]["status"] = "ok"
    (sweep / "run.json").write_text(json.dumps(record))
    assert nodes.federation_dir(tmp_path, 4, "fedavg") == sweep
    assert nodes.federation_dir(tmp_path, 2, "fedavg") == tmp_path / "nodes-2" / "fedavg"  # 2 nodes: never the sweep's


def test_the_segviz_table_gives_mean_and_std_over_cases_with_the_papers_row_below():
    dice = {"liver": [0.9, 0.7, 0.8], "spleen": [0.5, 0.1, 0.3]}
    scores = pd.DataFrame([{"setup": "2-node", "model": nodes.SEGVIZ, "case_id": f"c{k}", "organ": organ, "dice": d}
                           for organ, values in dice.items() for k, d in enumerate(values)])
    scores = pd.concat([scores, scores.assign(model="Something new", dice=scores["dice"] / 2)])
    table = nodes.segviz_table(scores)
    assert list(table.index) == ["2-node SegViz (this run)", "2-node SegViz (paper)", "2-node Something new (this run)"]
    row = table.loc["2-node SegViz (this run)"]
    assert row["liver"] == f"{np.mean(dice['liver']):.2f} ± {np.std(dice['liver'], ddof=1):.2f}" == "0.80 ± 0.10"
    assert row["spleen"] == "0.30 ± 0.20" and row["pancreas"] == "-" and row["cases"] == 3
    published = KANHERE_NODES[("2-node", nodes.SEGVIZ)]["liver"]  # the paper's row, to two decimals
    assert table.loc["2-node SegViz (paper)", "liver"] == "{:.2f} ± {:.2f}".format(*published)
    assert table.loc["2-node Something new (this run)", "liver"] == "0.40 ± 0.05"


def test_the_chains_own_fedavg_is_the_four_node_federation_unless_it_trained_other_settings(tmp_path):
    """The budget study's points hold the chain's FedAvg in the run folder itself: the 4-node conventional FL
    reuses it, but not when 03 ran with other clients or settings, or another loss than the profile's."""
    (tmp_path / "checkpoints" / "fl-global").mkdir(parents=True)
    (tmp_path / "checkpoints" / "fl-global" / "best.pt").write_bytes(b"")

    def chain(status="ok", **parameters):
        entry = {"status": status, "parameters": {"profile": "laptop", "seed": 0, "compare_loss": "", **parameters}}
        (tmp_path / "run.json").write_text(json.dumps({"notebooks": {"03_federated_training": entry},
                                                       "profile_config": {"train": {"loss": "dice_ce"}}}))

    chain()
    assert nodes.chain_federation(tmp_path) == "fedavg"
    assert nodes.federation_dir(tmp_path, 4, "fedavg") == tmp_path
    assert nodes.federation_dir(tmp_path, 4, "segviz") == tmp_path / "nodes-4" / "segviz"
    assert nodes.federation_dir(tmp_path, 2, "fedavg") == tmp_path / "nodes-2" / "fedavg"
    chain(loss="dice_ce")
    assert nodes.federation_dir(tmp_path, 4, "fedavg") == tmp_path
    for other in ({"status": "failed"}, {"loss": "literal_dice_ce"}, {"clients": "liver,spleen"}, {"rounds": 3}):
        chain(**other)
        assert nodes.federation_dir(tmp_path, 4, "fedavg") == tmp_path / "nodes-4" / "fedavg", other
    chain(method="segviz")
    assert nodes.federation_dir(tmp_path, 4, "segviz") == tmp_path
