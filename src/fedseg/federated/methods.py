"""The federated methods beyond FedAvg (docs/study.md, Experiments, items 4-7), as a profile's `federated.method`.

- `fedavg`: conventional FL (Shen et al. 2022), every parameter averaged with n_k / n.
- `ownerfedavg`: FedAvg, except the output layer: each channel's weights and bias are the n_k-weighted mean
  over the clients whose dataset annotates that channel (its owners) only; a channel nobody owns keeps its
  previous value. With a masked loss a non-owner sends that channel's output weights back unchanged, so
  FedAvg moves them by only n_owner / n of their owner's update (dilution); this removes the dilution and
  nothing else. It needs a network whose logits are one convolution's output (`models.output_layer`): UNet
  with `num_res_units: 0`, DynUNet and the other MONAI networks; it is refused on UNet with residual units,
  whose last ResidualUnit writes every logit with weights all clients train (`check_network`).
- `fedprox`: FedAvg with FedProx's proximal term (Li et al., MLSys 2020) in each client's local loss,
  mu/2 * ||w - w_global||^2, pulling local training towards the received global weights; mu = `federated.mu`.
- `segviz`: SegViz (Kanhere et al. 2024): the `SharedTaskUNet`; each client trains the shared block and its own
  task block, the server averages only the shared block (n_k / n) and keeps each task block as its owner
  sent it; the global model is then the meta-model (shared block + every client's task block).
- `fedgin`: FedGIN (Nagaraju et al. 2025): FedAvg with GIN augmentation (`fedseg.data.gin.RandGINd`) in every
  client's local training; `preprocess.gin` gives its settings (default `{prob: 0.5}`). Pair it with MRI-like clients
  (`data.phantom.mri_like`) for the cross-contrast experiment.
- `distill`: FedAvg where each client's unlabelled channels are supervised by the received global model's
  predictions on the same patch (ConDistFL-style conditional distillation, `fedseg.train.completion`), weighted
  by `federated.distill_weight`, on the voxels the client's own labels call background.
- `pseudo`: FedAvg, then from round `federated.pseudo_after` + 1 (default: half the rounds) each client lets the
  received global model label its training cases' unlabelled channels (sigmoid > 0.5, the largest connected
  component kept per channel, both kidneys; never over the client's own labels; `completion.pseudo_label`)
  and trains on the completed targets, every channel supervised (Wang & Ma 2022's pseudo-labelling, federated).

The arithmetic lives here as plain functions, tested on known tensors; the ClientApp and the strategy call them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedseg.data.labels import CHANNELS, owned_mask, pack_channels, unpack_channels
from fedseg.data.transforms import FOREGROUND, IMAGE, LABEL, evaluation_dataset
from fedseg.federated.sites import parse_client
from fedseg.train.completion import distillation_loss, pseudo_label_volume
from fedseg.train.models import NoOutputLayer, build_network, output_layer, parameter_group, shared_task_shape

METHODS: tuple[str, ...] = ("fedavg", "ownerfedavg", "fedprox", "segviz", "fedgin", "distill", "pseudo")
#: GIN settings of `fedgin` when the profile's `preprocess.gin` gives none.
GIN_DEFAULT: dict[str, Any] = {"prob": 0.5}
#: Defaults of each method's knobs in a profile's `federated:` section.
METHOD_DEFAULTS: dict[str, Any] = {"method": "fedavg", "mu": 0.01, "distill_weight": 1.0, "pseudo_after": None}
#: Components kept per channel when cleaning pseudo-labels: the largest, but both kidneys.
PSEUDO_COMPONENTS: dict[str, int | None] = {"kidney": 2}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"federated.method={method!r}: use one of {', '.join(METHODS)}.")
    return method


def network_config(cfg: Mapping[str, Any], datasets: Sequence[str]) -> dict[str, Any]:
    """The `model` section a method trains: the profile's network, or for SegViz a SharedTaskUNet with one
    task block per dataset, shaped like the profile's network (`models.shared_task_shape`: its channels and
    downsamplings; its blocks are MONAI's DynUNet blocks)."""
    model = dict(cfg["model"])
    if cfg["federated"].get("method", "fedavg") != "segviz":
        return model
    return {"name": "SharedTaskUNet", "tasks": list(dict.fromkeys(datasets)), **shared_task_shape(model)}


def dilution_layer(method: str, model: torch.nn.Module,
                   patch_size: Sequence[int] | None = None) -> tuple[dict[str, int] | None, str | None]:
    """The output layer (`models.output_layer`) a federation of `method` on `model` averages over owners
    (`ownerfedavg`) and measures its dilution on, or None and why it measures none.

    SegViz keeps each task block's head as its owner sent it: (None, None). A network without an output layer of
    its own (`models.NoOutputLayer`, e.g. UNet with residual units) measures no dilution, and says why, rather
    than measure weights that are not the logits' own; `ownerfedavg` on it is refused (ValueError).
    """
    if method == "segviz":
        return None, None
    try:
        return output_layer(model, patch_size), None
    except NoOutputLayer as error:
        if method == "ownerfedavg":
            raise ValueError(f"federated.method=ownerfedavg is refused on this network: {error}") from error
        return None, str(error)


def check_network(cfg: Mapping[str, Any]) -> None:
    """Refuse, before anything trains, a profile whose `federated.method` cannot run on its `model`:
    `ownerfedavg` on a network with no output layer of its own (`dilution_layer`)."""
    if (cfg.get("federated") or {}).get("method") != "ownerfedavg":
        return
    patch_size = (cfg.get("preprocess") or {}).get("patch_size")
    dilution_layer("ownerfedavg", build_network(**network_config(cfg, [])), patch_size)


def evaluation_block(model: torch.nn.Module, client: str) -> str | None:
    """The SegViz task block that alone gives the meta-model's output on `client`'s owned channels, else None.

    The meta-model takes each owned channel from its owner's task block (`models.meta_logits`), so scoring a
    client's owned channels needs only that block: the same logits at a quarter of the decoding (4 tasks).
    None (decode the whole meta-model) for a non-SegViz network or when another block gives an owned channel.
    """
    sources = getattr(model, "channel_source", None)
    if sources is None:
        return None
    dataset = parse_client(client)[0]
    owned = owned_mask(dataset).nonzero()[0]
    return dataset if all(sources[c] == dataset for c in owned) else None


def local_training_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The configuration a client trains under: FedGIN switches GIN augmentation on (profile's `preprocess.gin`,
    else `GIN_DEFAULT`); other methods train as the profile says."""
    if cfg["federated"].get("method") != "fedgin":
        return cfg
    return {**cfg, "preprocess": {**cfg["preprocess"], "gin": cfg["preprocess"].get("gin") or GIN_DEFAULT}}


def proximal_term(reference: Mapping[str, torch.Tensor], mu: float):
    """FedProx's term mu/2 * sum over trainable parameters of ||w - w_global||^2, as a training extra loss.

    `reference` is the received global state_dict; it is copied, detached, so only w gets a gradient
    (mu * (w - w_global)).
    """
    frozen = {key: value.detach().clone() for key, value in reference.items()}

    def term(model: torch.nn.Module, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        total = logits.new_zeros(())
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                total = total + (parameter - frozen[name].to(parameter.device)).pow(2).sum()
        return 0.5 * mu * total

    return term


def selective_average(states: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int],
                      datasets: Sequence[str],
                      previous: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """SegViz aggregation of SharedTaskUNet states, one per replying client (client k's dataset `datasets[k]`).

    `shared.*` entries: the n_k / n weighted mean over all clients. `task.<t>.*` entries: those of the
    client(s) whose dataset is t, byte for byte when there is one (the n_k-weighted mean of t's shards
    otherwise); a task block no replying client owns keeps `previous` (the last global model). Integer
    buffers are rounded back to their dtype.
    """
    if not (len(states) == len(num_examples) == len(datasets)) or not states:
        raise ValueError(f"selective_average needs one state, size and dataset per client: got {len(states)}, "
                         f"{len(num_examples)}, {len(datasets)}.")
    total = float(sum(num_examples))
    out: dict[str, np.ndarray] = {}
    for key in states[0]:
        group = parameter_group(key)
        if group == "shared":
            members = list(range(len(states)))
        else:
            members = [k for k, d in enumerate(datasets) if d == group.split(":", 1)[1]]
            if not members:
                if previous is None:
                    raise ValueError(f"No client owns {key!r} and there is no previous global model to keep it from.")
                out[key] = previous[key]
                continue
        if len(members) == 1 and group != "shared":
            out[key] = states[members[0]][key]  # the owner's block, untouched
            continue
        weight = total if group == "shared" else float(sum(num_examples[k] for k in members))
        mean = sum((num_examples[k] / weight) * states[k][key].astype(np.float64) for k in members)
        dtype = states[0][key].dtype
        out[key] = (np.rint(mean) if np.issubdtype(dtype, np.integer) else mean).astype(dtype)
    return out


def _channel(array: np.ndarray, axis: int, channel: int) -> np.ndarray:
    return np.take(array, channel, axis=axis).astype(np.float64).ravel()


def channel_owners(datasets: Sequence[str], channel: int) -> list[int]:
    """Indices of the clients whose dataset annotates `channel` (client names of shards map to their dataset)."""
    return [k for k, name in enumerate(datasets) if owned_mask(parse_client(name)[0])[channel]]


def owner_output_average(states: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int],
                         datasets: Sequence[str], output_axes: Mapping[str, int],
                         previous: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`ownerfedavg`'s output layer: for each key of `output_axes` (`models.output_layer`) and each channel c
    along its axis, the n_k-weighted mean over the clients owning c (`channel_owners`, weights n_k / sum of
    the owners' n_k); a channel no replying client owns (background always) keeps `previous`."""
    if not (len(states) == len(num_examples) == len(datasets)) or not states:
        raise ValueError(f"owner_output_average needs one state, size and dataset per client: got {len(states)}, "
                         f"{len(num_examples)}, {len(datasets)}.")
    out = {}
    for key, axis in output_axes.items():
        reference = np.asarray(previous[key])
        result = reference.astype(np.float64, copy=True)
        for channel in range(reference.shape[axis]):
            owners = channel_owners(datasets, channel)
            if not owners:
                continue
            weight = float(sum(num_examples[k] for k in owners))
            index = [slice(None)] * reference.ndim
            index[axis] = channel
            result[tuple(index)] = sum((num_examples[k] / weight)
                                       * np.asarray(states[k][key], dtype=np.float64)[tuple(index)]
                                       for k in owners)
        out[key] = result.astype(reference.dtype)
    return out


def output_moves(previous: Mapping[str, np.ndarray], states: Sequence[Mapping[str, np.ndarray]],
                 num_examples: Sequence[int], datasets: Sequence[str], averaged: Mapping[str, np.ndarray],
                 output_axes: Mapping[str, int]) -> list[dict[str, Any]]:
    """How far one round moved each foreground channel's output weights (weight row and bias together).

    Per channel c: `owner_move`, the L2 norm of the owners' n_k-weighted mean update (w_k - w_previous);
    `others_move`, the same over the clients that do not own c (0 with a masked loss: their gradient on c is
    exactly zero); `global_move`, the norm of the aggregated model's change; `ratio` = global / owner move,
    which FedAvg makes n_owner / n (`owner_share`) when the others do not move c; `cosine` between the global
    and the owners' update (negative: the others pull c the other way, as a literal loss teaching "absent" does).
    """
    def vector(arrays: Mapping[str, np.ndarray], channel: int) -> np.ndarray:
        """Channel `channel`'s output weights (its weight row and bias) as one float64 vector."""
        return np.concatenate([_channel(np.asarray(arrays[k]), axis, channel) for k, axis in output_axes.items()])

    total = float(sum(num_examples))
    rows = []
    for channel in range(1, len(CHANNELS)):
        start = vector(previous, channel)

        def update(members: list[int]) -> np.ndarray:
            weight = float(sum(num_examples[k] for k in members))
            if not members or weight <= 0:
                return np.zeros_like(start)
            return sum((num_examples[k] / weight) * (vector(states[k], channel) - start) for k in members)

        owners = channel_owners(datasets, channel)
        others = [k for k in range(len(states)) if k not in owners]
        owner, other = update(owners), update(others)
        moved = vector(averaged, channel) - start
        owner_norm, global_norm = float(np.linalg.norm(owner)), float(np.linalg.norm(moved))
        rows.append({"channel": CHANNELS[channel], "owners": ",".join(datasets[k] for k in owners),
                     "owner_share": sum(num_examples[k] for k in owners) / total, "owner_move": owner_norm,
                     "others_move": float(np.linalg.norm(other)), "global_move": global_norm,
                     "ratio": global_norm / owner_norm if owner_norm > 0 else float("nan"),
                     "cosine": float(owner @ moved / (owner_norm * global_norm)) if owner_norm > 0 and global_norm > 0
                     else float("nan")})
    return rows


def distillation_term(teacher: torch.nn.Module, weight: float):
    """ConDistFL-style distillation as a training extra loss: `weight` x `completion.distillation_loss` of
    the student's logits against the frozen `teacher`'s (the received global model) on the same patch, over
    the channels the sample's dataset does not own, on voxels its own labels call background."""
    teacher = teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)

    def term(model: torch.nn.Module, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        image = batch[IMAGE]
        teacher.to(image.device)
        with torch.no_grad():
            reference = teacher(image).float()
        target = batch[LABEL].to(image.device)
        return weight * distillation_loss(logits, reference, batch["owned"].to(image.device), target=target,
                                          condition_on_background=True)

    return term


def pseudo_labelled_volumes(cfg: dict[str, Any], teacher: torch.nn.Module, records: list[dict[str, Any]],
                            device: torch.device, folder: str | Path | None = None) -> Sequence[dict[str, Any]]:
    """The client's preprocessed training volumes with their unowned channels completed by `teacher`
    (`completion.pseudo_label_volume`), the owned mask switched on for those channels, and the sampler's
    foreground recomputed from the completed target.

    With `folder` (the client's `pseudo/` folder) each completed target is written there as one byte per voxel
    (`labels.pack_channels`) and a `CompletedVolumes` reads the cases back one at a time, so a client holds one
    volume in memory, not all of its training set; without it, a list in memory (small data, tests).
    """
    teacher = teacher.to(device).eval()
    cached = evaluation_dataset(cfg, records)
    volumes = []
    if folder is not None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
    for index in range(len(cached)):
        case = dict(cached[index])
        target, owned = pseudo_label_volume(teacher, torch.as_tensor(case[IMAGE]), torch.as_tensor(case[LABEL]),
                                            np.asarray(case["owned"]), cfg, device,
                                            num_components=PSEUDO_COMPONENTS)
        owned = np.asarray(owned).astype(np.uint8)
        if folder is not None:
            path = folder / f"{index}.pt"
            torch.save({"label": torch.from_numpy(pack_channels(np.asarray(target))), "owned": owned,
                        "case_id": records[index]["case_id"]}, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
            continue
        volumes.append(_completed(case, torch.as_tensor(target).to(torch.uint8), owned))
    return CompletedVolumes(cached, folder) if folder is not None else volumes


def _completed(case: dict[str, Any], target: torch.Tensor, owned: np.ndarray) -> dict[str, Any]:
    """`case` with its completed (8, X, Y, Z) uint8 target, owned mask and the sampler's foreground from them."""
    return {**case, LABEL: target, "owned": owned, FOREGROUND: target[1:].amax(dim=0, keepdim=True)}


class CompletedVolumes(Sequence):
    """A client's cached training volumes with the completed targets `pseudo_labelled_volumes` wrote to `folder`,
    read one case at a time (what `training.PatchBatches` draws its patches from)."""

    def __init__(self, cached: Sequence[dict[str, Any]], folder: str | Path):
        self.cached, self.folder = cached, Path(folder)

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        saved = torch.load(self.folder / f"{index}.pt", weights_only=False)
        return _completed(dict(self.cached[index]), torch.from_numpy(unpack_channels(saved["label"].numpy())),
                          saved["owned"])
