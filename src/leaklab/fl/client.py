"""leaklab's Flower ClientApp: each SuperNode trains on its private shard with leaklab's victim code.

Per round the client draws its batch (``batch-size`` texts of the corpus's private split, distinct across
clients and rounds), loads the global weights, runs leaklab's local SGD steps on them in place
(:meth:`leaklab.threat.local.LocalTrainer.sgd_steps`; FedSGD: one SGD step at η on the batch; FedAvg and LoRA:
``local-steps`` passes) and replies with its weights and ``num-examples``. The private batch never enters a
Flower message: with ``secrets-dir`` set, the client writes it there for the auditor's scoring only.

Flower's LocalDpMod and secaggplus_mod (flwr 1.42) read and write the legacy fit layout
(``fitins.parameters`` / ``fitres.parameters``), so those defenses run on the legacy server path
(``DefaultWorkflow``); the train handler answers both layouts. :func:`flower_defenses` is the one client mod:
it applies the Flower mod the server's config names.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from leaklab.corpora import Sample, load_corpus, sample_texts
from leaklab.fl.config import defense_of
from leaklab.fl.model import load_tensors, shared_names, working_model
from leaklab.io import atomic_write_json
from leaklab.models.registry import ModelRef, load_model
from leaklab.threat.local import LocalTrainer, TextObjective, text_batch

LEGACY_IN = "fitins.parameters"
LEGACY_CONFIG = "fitins.config"
SECAGG_CONFIGS = "secaggplus_configs"  # flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS


@functools.cache
def _pool(model: str, corpus: str, n: int, seed: int, min_tokens: int, max_tokens: int) -> Sample:
    return sample_texts(load_corpus(corpus), load_model(ModelRef(model)).tokenizer, n, seed, min_tokens, max_tokens)


def private_batch(cfg: dict[str, Any], partition: int, server_round: int) -> tuple[list[str], list[int]]:
    """Client ``partition``'s batch in round ``server_round``: a disjoint slice of one seeded private sample."""
    b, rounds, clients = int(cfg["batch-size"]), int(cfg["rounds"]), int(cfg["clients"])
    pool = _pool(
        cfg["model"],
        cfg["corpus"],
        b * rounds * clients,
        int(cfg["seed"]),
        int(cfg["min-tokens"]),
        int(cfg["max-tokens"]),
    )
    start = ((server_round - 1) * clients + partition) * b
    return pool.texts[start : start + b], pool.labels[start : start + b]


def train_locally(
    cfg: dict[str, Any], weights: Mapping[str, Any] | None, texts: list[str], labels: list[int], seed: int
):
    """The client's new weights θ_k after leaklab's local SGD steps (FedSGD: one), and the batch's token ids.

    ``weights`` (the global weights; None: already loaded) are copied into the client's working model, which the
    steps then update in place (:meth:`LocalTrainer.sgd_steps`, the steps of leaklab's FedSGD/FedAvg victim,
    without its private copy, start weights and delta: the client replies with weights, not a delta): the
    returned tensors are that model's own (valid until the next call), so a client holds one copy of the model
    beside the step's gradient."""
    model = working_model(cfg["model"], cfg["setting"], int(cfg["lora-r"]))
    if weights is not None:
        load_tensors(model, weights)
    loaded = load_model(ModelRef(cfg["model"]))
    batch, ids, _ = text_batch(loaded, texts, labels)
    objective = TextObjective(batch, loaded.ref.task)
    LocalTrainer(model).sgd_steps(objective, int(cfg["local-steps"]), float(cfg["lr"]), None, seed)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, ids


def write_secret(cfg: dict[str, Any], server_round: int, node_id: int, texts, ids, labels) -> None:
    """The private batch, for the auditor's scoring only (never part of a Flower message)."""
    folder = str(cfg.get("secrets-dir") or "")
    if folder:
        path = Path(folder) / f"round-{server_round:03d}" / f"node-{node_id}.json"
        atomic_write_json(path, {"texts": list(texts), "token_ids": [list(t) for t in ids], "labels": list(labels)})


def flower_defenses(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply the client-side Flower mod the run names: secaggplus_mod for SecAgg+ messages, LocalDpMod when the
    train config says ``local-dp``; otherwise pass the message on."""
    from flwr.client.mod import LocalDpMod, secaggplus_mod

    if SECAGG_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    config = msg.content.config_records.get(LEGACY_CONFIG) or ConfigRecord()
    name, opts = defense_of(str(config.get("defense", "none")))
    if name == "local-dp":
        return LocalDpMod(opts.clip, opts.sensitivity, opts.epsilon, opts.delta)(msg, context, call_next)
    return call_next(msg, context)


client_app = ClientApp(mods=[flower_defenses])


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training, in the Message API layout or (under LocalDpMod/SecAgg+) the legacy one."""
    legacy = LEGACY_IN in msg.content.array_records
    cfg = dict(msg.content.config_records[LEGACY_CONFIG if legacy else "config"])
    server_round = int(cfg["server-round"])
    partition = int(context.node_config.get("partition-id", 0))
    texts, labels = private_batch(cfg, partition, server_round)
    model = working_model(cfg["model"], cfg["setting"], int(cfg["lora-r"]))
    names = shared_names(model)
    if legacy:
        load_tensors(model, _legacy_weights(msg, names))
    else:
        load_record(model, msg.content.array_records["arrays"])
    seed = int(cfg["seed"]) * 100_003 + server_round * 1_009 + partition
    new, ids = train_locally(cfg, None, texts, labels, seed)
    write_secret(cfg, server_round, context.node_id, texts, ids, labels)
    if legacy:
        secure = defense_of(str(cfg.get("defense", "none")))[0] == "secagg+"
        return Message(_legacy_reply([new[n] for n in names], len(texts), secure), reply_to=msg)
    content = RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord({"num-examples": len(texts)})})
    return Message(content, reply_to=msg)


def load_record(model: torch.nn.Module, record: ArrayRecord) -> None:
    """Copy the global weights into ``model`` one array at a time (no second copy of the whole model)."""
    params = dict(model.named_parameters())
    missing = [n for n in shared_names(model) if n not in record]
    if missing:
        raise ValueError(f"the global weights lack {len(missing)} shared tensors (first: {missing[0]})")
    with torch.no_grad():
        for name, array in record.items():
            params[name].copy_(torch.from_numpy(array.numpy()).reshape(params[name].shape))


def _legacy_weights(msg: Message, names: list[str]) -> dict[str, torch.Tensor]:
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    arrays = parameters_to_ndarrays(compat.recorddict_to_fitins(msg.content, keep_input=True).parameters)
    return {n: torch.from_numpy(a.copy()) for n, a in zip(names, arrays, strict=True)}


def _legacy_reply(tensors: list[torch.Tensor], num_examples: int, secure: bool) -> RecordDict:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    # under SecAgg+ float64 (exact for float32 weights): Flower's SecAgg+ quantiser computes in the array's dtype,
    # and in float32 its steps of 2·clipping_range/quantization_range would round to float32's spacing at
    # 2^log2(range); otherwise (LocalDpMod) float32, half the memory
    params = ndarrays_to_parameters([(t.double() if secure else t).numpy() for t in tensors])
    return compat.fitres_to_recorddict(FitRes(Status(Code.OK, ""), params, num_examples, {}), keep_input=True)
