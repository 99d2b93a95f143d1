"""The study's ClientApp: one site owns one dataset and sends back only weights and scalar metrics.

train: load the global weights, run `local_steps` of the study's one training loop on the site's own
training cases, keep the FL local best (the locally trained model with the best validation mean Dice
over the site's owned channels) in `<run_dir>/checkpoints/fl-local-<dataset>/best.pt`, reply the
weights with `num-examples` = the number of training cases (FedAvg's n_k). evaluate: score the global
weights on the site's validation cases. Site identity: node_config `dataset` (deployment), else
`partition-id` into run_config `clients`.
"""

from __future__ import annotations

import contextlib

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedseg.data.labels import TRAIN_DATASETS
from fedseg.data.transforms import evaluation_dataset
from fedseg.federated import methods, settings, sites, task
from fedseg.train.models import build_network, load_weights
from fedseg.train.training import (
    channel_means,
    save_checkpoint,
    select_device,
    validate,
)

app = ClientApp()


def _site(context: Context) -> tuple[dict, str, int, list, list]:
    """(cfg, dataset, partition id, train records, val records) of this site."""
    dataset, partition_id = sites.site_identity(context.node_config, context.run_config)
    cfg = settings.study_config(context.run_config, context.node_config)
    train, val = task.client_records(cfg, task.load_cases(cfg, context.run_config), dataset)
    return cfg, dataset, partition_id, train, val


@contextlib.contextmanager
def _named_failure(context: Context, kind: str, server_round: int):
    """Re-raise any failure with the site's dataset in the message (the server shows it in its error)."""
    try:
        yield
    except Exception as error:
        who = context.node_config.get("dataset") or f"partition {context.node_config.get('partition-id')}"
        with contextlib.suppress(Exception):
            who = sites.site_identity(context.node_config, context.run_config)[0]
        raise RuntimeError(f"Client {who!r} failed in {kind} of round {server_round}: {_causes(error)}") from error


def _causes(error: BaseException) -> str:
    """An exception and its causes on one line (MONAI wraps the real error, e.g. a missing file)."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen and len(chain) < 5:
        seen.add(id(error))
        chain.append(f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}")
        error = error.__cause__ or error.__context__
    return " <- ".join(chain)


def identity(client: str) -> dict[str, int]:
    """What a reply says about who sent it: the dataset's index and, for a shard, its index and count."""
    dataset, shard, shards = sites.parse_client(client)
    return {"dataset-index": TRAIN_DATASETS.index(dataset), "shard": shard, "shards": shards}


def _global_model(cfg: dict, msg: Message):

    model = build_network(**cfg["model"])
    return load_weights(model, msg.content["arrays"].to_torch_state_dict())


def _keep_local_best(context: Context, cfg: dict, dataset: str, federation: str, server_round: int, model,
                     metric: float) -> bool:
    """Save the model if it beats this site's local best so far in this federation (`federation`: the id the
    server sends each round). The bar is context.state's, else (a restarted client) the checkpoint on disk if
    this federation wrote it; a local best of an earlier federation in the same folder never counts, whichever
    round this federation validates first (`federated.val_every`)."""
    path = task.local_best_path(cfg["run_dir"], dataset)
    kept = context.state.get("local-best")
    if kept is not None and str(kept.get("federation-id", "")) == federation:
        best = float(kept["val-mean-dice"])
    else:  # a new federation, or a restarted client: its state is gone, the checkpoint (if this federation's) is not
        best = task.saved_metric(path, federation)
    if not metric > best:
        return False
    save_checkpoint(task.state_dict_cpu(model), path, step=server_round, val_mean_dice=metric,
                    federation_id=federation, settings=task.federation_settings(cfg))
    context.state["local-best"] = ConfigRecord({"val-mean-dice": metric, "round": server_round,
                                                "federation-id": federation})
    return True


def _federation(msg: Message) -> str:
    """The federation a train message belongs to (the server's `StudyFedAvg.federation_id`)."""
    federation = str(msg.content["config"].get(task.FEDERATION_KEY, ""))
    if not federation:
        raise ValueError(f"The train message has no {task.FEDERATION_KEY!r} in its config: the server is not the "
                         "study's ServerApp (or an older one); start the federation with this fedseg's ServerApp.")
    return federation


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who this site is (its client name as `identity` metrics): the server asks before round 1, so it can say
    which sites are missing and name a site it later loses; asked for them, also its cases' fingerprints
    (`task.site_cases`)."""
    with _named_failure(context, "the identity query", 0):
        client, partition_id = sites.site_identity(context.node_config, context.run_config)
        content = RecordDict({"metrics": MetricRecord({"partition-id": partition_id, **identity(client)})})
        if msg.content["config"].get(task.CASES_KEY):  # the server stamps its resumable state with them
            train_records, val_records = _site(context)[3:]
            content[task.CASES_KEY] = ConfigRecord(task.site_cases(train_records, val_records))
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training from the global weights; replies weights + n_k + scalar metrics."""
    server_round = int(msg.content["config"]["server-round"])
    with _named_failure(context, "train", server_round):
        federation = _federation(msg)
        cfg, dataset, partition_id, train_records, val_records = _site(context)
        model = _global_model(cfg, msg)
        method = methods.get(cfg["federated"]["method"])
        local_cfg = method.local_config(cfg)
        hooks = method.hooks(methods.LocalRound(cfg=local_cfg, client=dataset, server_round=server_round, model=model,
                                                global_model=lambda: _global_model(cfg, msg),
                                                train_records=train_records))
        result = task.train_locally(local_cfg, model, dataset, server_round, train_records, val_records, hooks=hooks)
        final = result["final"]
        metric = float(final["val_mean_dice"])
        updated = _keep_local_best(context, cfg, dataset, federation, server_round, model, metric)
        metrics = {"num-examples": len(train_records), "partition-id": partition_id,
                   **identity(dataset), "train-loss": result["train_loss"],
                   "mean-dice": metric, "local-best-updated": int(updated),
                   **task.channel_dice({c[5:]: final[c] for c in final.index if c.startswith("dice_")})}
        content = RecordDict({"arrays": ArrayRecord(task.state_dict_cpu(model)), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validation Dice of the global weights on this site's validation cases (owned channels)."""
    server_round = int(msg.content["config"]["server-round"])
    with _named_failure(context, "evaluate", server_round):
        cfg, dataset, partition_id, _, val_records = _site(context)
        device = select_device()
        model = _global_model(cfg, msg).to(device)
        # SegViz: the owner's block = the meta-model here
        block = methods.get(cfg["federated"]["method"]).evaluation_block(model, dataset)
        means = channel_means(validate(model, evaluation_dataset(cfg, val_records), val_records, cfg, device,
                                       task=block))
        metrics = {"num-examples": len(val_records), "partition-id": partition_id,
                   **identity(dataset), "mean-dice": float(means.mean()),
                   **task.channel_dice(means.to_dict())}
        content = RecordDict({"metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)
