"""A playground federation, round by round: its run config, the study's ServerApp on the in-process grid, and
what each round hands to the dashboard (`RoundView`: the study's tables so far and one predicted slice per site)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord, Message

from fedseg import run_folder
from fedseg.data.labels import FOREGROUND, owned_channels
from fedseg.data.transforms import IMAGE, LABEL, case_records, evaluation_dataset
from fedseg.experiments.playground.grid import InProcessGrid, serve
from fedseg.experiments.playground.settings import (
    THREADS,
    Settings,
    playground_cases,
    playground_profile,
    prepare_data,
)
from fedseg.federated import client_app, methods
from fedseg.federated.settings import study_config
from fedseg.federated.simulation import federation_run_config
from fedseg.federated.sites import parse_client
from fedseg.train import inference
from fedseg.train.models import build_network, load_weights
from fedseg.train.training import select_device

# --------------------------------------------------------------------------------------------------
# A run, round by round
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RoundView:
    """What the playground shows after a round: the study's own tables so far and one slice per site."""
    round: int
    rounds: pd.DataFrame  #: `metrics/fl_rounds.csv` so far (train rows: local models; evaluate/global: the global)
    dilution: pd.DataFrame  #: `metrics/fl_dilution.csv` so far (empty when the method measures none)
    slices: dict[str, dict[str, np.ndarray]]  #: dataset -> image, truth, prediction (axial slices, RAS)
    seconds: float  #: since the run started
    note: str | None = None  #: why no dilution is measured, when none is


@dataclasses.dataclass
class PlaygroundRun:
    """A finished playground federation: its settings, run folder, the study's tables and the last round's view."""
    settings: Settings
    run_dir: Path
    rounds: pd.DataFrame
    dilution: pd.DataFrame
    dilution_note: str | None  #: why no dilution was measured (SegViz; a network without an output layer)
    views: list[RoundView]
    seconds: float
    owner_share: dict[str, float]  #: each foreground channel's owners' share of training cases (n_owner / n)


def run_config_of(settings: Settings, run_dir: str | Path, data_root: str | Path) -> dict[str, Any]:
    """The run config `flwr run --run-config` would give this federation (`simulation.federation_run_config`)."""
    profile = playground_profile(settings)
    profile["data_root"] = str(Path(data_root).resolve())
    knobs = {"loss": settings.loss, "method": settings.method, "rounds": settings.rounds,
             "local_steps": settings.local_steps, "mu": settings.mu}
    return federation_run_config(profile, run_dir, seed=settings.seed, clients=settings.sites,
                                 shards=settings.shards_text(), progress=False, overwrite=True, **knobs)


def run(settings: Settings, run_dir: str | Path, cases: pd.DataFrame | None = None,
        data_root: str | Path | None = None,
        on_round: Callable[[RoundView], None] | None = None, threads: int | None = THREADS) -> PlaygroundRun:
    """Run the federation `settings` describe in `run_dir` through the study's ServerApp and ClientApp.

    `cases` / `data_root`: the data (default: `prepare_data(settings.seed)`); the federation trains on
    `playground_cases(cases, settings)`. `on_round(view)` is called after every round with the study's tables so
    far and one predicted slice per site. `threads`: torch's CPU threads while it runs (None: leave as set).
    Raises (`strategies.FederationError`) when a site fails."""
    with _torch_threads(threads):
        return _run(settings, run_dir, cases, data_root, on_round)


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(settings: Settings, run_dir: str | Path, cases: pd.DataFrame | None, data_root: str | Path | None,
         on_round: Callable[[RoundView], None] | None) -> PlaygroundRun:
    began = time.perf_counter()
    if cases is None or data_root is None:
        data_root, cases = prepare_data(settings.seed, data_root)
    run_dir = Path(run_dir).resolve()
    run_config = run_config_of(settings, run_dir, data_root)
    fed_cases = playground_cases(cases, settings)
    run_folder.fl_dir(run_dir).mkdir(parents=True, exist_ok=True)
    for stale in ("fl_rounds.csv", "fl_dilution.csv"):
        run_folder.metrics_file(run_dir, stale).unlink(missing_ok=True)
    fed_cases.to_csv(run_config["cases"], index=False)
    cfg = study_config(run_config)  # what the ServerApp and every ClientApp will resolve (settings.study_config)
    methods.check_network(cfg)
    clients = settings.clients()
    watcher = _Watcher(cfg, run_dir, clients, fed_cases, began, on_round, settings)
    serve(InProcessGrid(client_app.app, run_config, len(clients), on_sent=watcher.sent))
    watcher.flush()
    return PlaygroundRun(settings=settings, run_dir=run_dir, rounds=watcher.rounds_table(),
                         dilution=watcher.dilution_table(), dilution_note=watcher.note(), views=watcher.views,
                         seconds=time.perf_counter() - began, owner_share=owner_shares(fed_cases, settings.sites))


def owner_shares(cases: pd.DataFrame, datasets: Sequence[str]) -> dict[str, float]:
    """Each foreground channel's owners' share of the federation's training cases, n_owner / n: what FedAvg keeps
    of the owners' update of that channel's head when the others leave it alone (docs/mechanisms.md)."""
    train = cases[(cases["split"] == "train") & cases["dataset"].isin(datasets)]
    counts = train["dataset"].value_counts()
    total = float(counts.sum())
    return {c: float(sum(counts.get(d, 0) for d in datasets if c in owned_channels(d)) / total) for c in FOREGROUND}


class _Watcher:
    """Follows the exchanges on the grid: a round is complete when the next round's train messages go out (the
    strategy has then written the round's rows) or when the ServerApp returns; then `on_round` gets its view."""

    def __init__(self, cfg: dict[str, Any], run_dir: Path, clients: Sequence[str], cases: pd.DataFrame,
                 began: float, on_round: Callable[[RoundView], None] | None, settings: Settings):
        self.cfg, self.run_dir, self.began, self.on_round = cfg, run_dir, began, on_round
        self.method = settings.method
        self._note: str | None | bool = False  # not looked up yet
        self.pending: tuple[int, ArrayRecord] | None = None
        self.views: list[RoundView] = []
        self.device = select_device()
        self.volumes = _site_volumes(cfg, cases, clients)

    def sent(self, kind: str, messages: list[Message], replies: list[Message]) -> None:
        if kind == "train":
            self.flush()
        elif kind == "evaluate":
            config = messages[0].content["config"]
            self.pending = (int(config["server-round"]), messages[0].content["arrays"])

    def flush(self) -> None:
        if self.pending is None:
            return
        server_round, arrays = self.pending
        self.pending = None
        model = load_weights(build_network(**self.cfg["model"]), arrays.to_torch_state_dict()).to(self.device)
        view = RoundView(round=server_round, rounds=self.rounds_table(), dilution=self.dilution_table(),
                         slices=predicted_slices(model, self.volumes, self.cfg, self.device),
                         seconds=time.perf_counter() - self.began, note=self.note())
        self.views.append(view)
        if self.on_round is not None:
            self.on_round(view)

    def note(self) -> str | None:
        """Why the federation measures no dilution: the note the ServerApp wrote (`strategies.record_dilution`),
        or for SegViz, which writes none, its reason; None when it measures it."""
        if self._note is not False:
            return self._note
        path = run_folder.dilution_not_measured(self.run_dir)
        if path.exists():
            self._note = path.read_text().strip()
        elif methods.get(self.method).output_layer(build_network(**self.cfg["model"]))[0] is None:
            self._note = ("SegViz keeps each task block's head as its owner sent it (Kanhere et al. 2024): no head "
                          "is averaged over sites that do not own it, so there is nothing to dilute.")
        else:
            self._note = None
        return self._note

    def rounds_table(self) -> pd.DataFrame:
        path = run_folder.metrics_file(self.run_dir, "fl_rounds.csv")
        return pd.read_csv(path) if path.exists() else pd.DataFrame()

    def dilution_table(self) -> pd.DataFrame:
        path = run_folder.metrics_file(self.run_dir, "fl_dilution.csv")
        return pd.read_csv(path) if path.exists() else pd.DataFrame()


def _site_volumes(cfg: dict[str, Any], cases: pd.DataFrame, clients: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each dataset's first validation volume, preprocessed as validation reads it, and the axial slice shown: the
    one with most of the dataset's own labels (`evaluation_dataset`)."""
    out = {}
    for dataset in dict.fromkeys(parse_client(c)[0] for c in clients):
        rows = cases[(cases["dataset"] == dataset) & (cases["split"] == "val")].sort_values("case_id").head(1)
        record = case_records(cfg["data_root"], rows)
        volume = evaluation_dataset(cfg, record)[0]
        label = np.asarray(volume[LABEL]).astype(bool)
        owned = np.flatnonzero(np.asarray(record[0]["owned"]))
        area = label[owned].any(axis=0).sum(axis=(0, 1))
        out[dataset] = {"image": torch.as_tensor(volume[IMAGE]), "label": label, "z": int(np.argmax(area)),
                        "case_id": record[0]["case_id"]}
    return out


def predicted_slices(model: torch.nn.Module, volumes: Mapping[str, Mapping[str, Any]], cfg: dict[str, Any],
                     device: torch.device) -> dict[str, dict[str, np.ndarray]]:
    """Per dataset: its validation slice's image, labels and the global model's prediction (sigmoid > 0.5 of
    `inference.predict_logits`, the study's sliding-window inference), each (channels,) x, y in RAS."""
    out = {}
    for dataset, volume in volumes.items():
        logits = inference.predict_logits(model, volume["image"], cfg, device)
        z = volume["z"]
        out[dataset] = {"image": volume["image"][0, :, :, z].numpy(), "label": volume["label"][:, :, :, z],
                        "prediction": (torch.sigmoid(logits[:, :, :, z]) > 0.5).numpy(),
                        "case_id": volume["case_id"]}
    return out
