"""AuditStrategy: wrap any Flower strategy (as Flower's DP wrappers do) and attack what the server receives.

Per round the wrapper records the global weights it sends, then each client's reply and the aggregate. The
:class:`Auditor` turns each into a leaklab :class:`~leaklab.threat.observation.Observation` — the shared tensors
Δ = θ_sent − θ_reply (one SGD step: Δ = η·g), the setting, the protocol facts the server set (η, local steps),
and what the server learns (``num-examples`` → ``batch_size_known``) — stores it as a leaklab update file
(:func:`leaklab.threat.store.save_update`; the clients' private batches, which never cross Flower, are read
from the run's secrets folder and stored apart for scoring) and runs the configured attacks through
leaklab's runner. The aggregate is an Observation of the ``secagg`` setting: the mean update of all clients,
attacked as one larger batch.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from leaklab.fl.config import FlRun, defense_of
from leaklab.fl.model import base_model, lora_meta
from leaklab.io import atomic_write_json
from leaklab.models.registry import ModelRef, load_model
from leaklab.threat.local import DELTA
from leaklab.threat.observation import Observation, Secret, ThreatFlags

Tensors = dict[str, torch.Tensor]
Event = Callable[[str, dict[str, Any]], None]


class Auditor:
    """Turns captured Flower updates into Observations, stores them and attacks them (see the module doc)."""

    def __init__(
        self,
        run: FlRun,
        out: str | Path | None = None,
        on_event: Event | None = None,
        attack: bool = True,
        defer: bool = False,
    ):
        """``attack``: attack the chosen updates at all; ``defer``: only store them while the federation runs and
        attack them from their files in :meth:`attack_stored` (a captured update is not kept in memory)."""
        self.run = run
        self.out = Path(out) if out else Path(tempfile.mkdtemp(prefix="leaklab-fl-"))
        self._owns_out = not out
        self.on_event = on_event or (lambda kind, info: None)
        self.attack = attack
        self.defer = defer
        self.pending: list[tuple[int, str, Path]] = []
        self._chosen: dict[int, set[str]] = {}
        self.records: list[dict[str, Any]] = []
        self.utility: dict[int, float] = {}
        self.replies: dict[int, int] = {}  # round -> clients whose updates were aggregated
        self.defenses: list[dict[str, Any]] = []
        self._sent: dict[int, Tensors] = {}
        self._refs: dict[int, tuple[ModelRef, dict[str, Any]]] = {}
        self._model: torch.nn.Module | None = None  # a scratch copy for validation and saving global weights

    @property
    def secrets_dir(self) -> Path:
        return self.out / "secrets"

    # ------------------------------------------------------------------ what the server sent
    def sent(self, server_round: int, tensors: Tensors | RecordTensors) -> None:
        """The global weights of ``server_round`` (kept as given, not copied: the caller hands over fresh tensors):
        the attacker's model is rebuilt from them. Earlier rounds' weights (and the model built from them) are
        dropped: a round's updates all arrive before the next round starts. A second call for the same round (an
        auditor at two places of one strategy, e.g. inside and outside server-side DP) keeps the first."""
        from leaklab.models.registry import unload

        if server_round in self._sent:
            return
        for ref, _ in self._refs.values():
            if ref.name != self.run.model:
                unload(ref)
        if not isinstance(tensors, RecordTensors):  # a record's tensors are read from it when needed
            tensors = {k: v.detach().float() for k, v in tensors.items()}
        self._sent = {server_round: tensors}
        self._refs = {server_round: self._global_ref(server_round, self._sent[server_round])}
        self.on_event("round", {"round": server_round})

    def _global_ref(self, server_round: int, tensors: Tensors) -> tuple[ModelRef, dict[str, Any]]:
        """The ModelRef (and LoRA meta) of the global weights: the packaged model while they are its own, else
        a saved Hugging Face folder (full model) or adapter file (LoRA) in the run folder."""
        ref = ModelRef(self.run.model)
        meta = lora_meta(self.run.model, self.run.lora_r) if self.run.setting == "lora" else {}
        initial = dict(base_model(self.run.model, self.run.setting, self.run.lora_r).named_parameters())
        if all(torch.equal(initial[k].detach(), v) for k, v in tensors.items()):
            return ref, meta
        folder = self.out / f"round-{server_round:03d}" / "global"
        if self.run.setting == "lora":
            from safetensors.torch import save_file

            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter.safetensors"))
            return ref, {**meta, "adapter_weights": str(folder / "adapter.safetensors")}
        from leaklab.fl.model import load_tensors

        model = self._scratch_model()
        load_tensors(model, tensors)
        model.save_pretrained(str(folder))
        load_model(ref).tokenizer.save_pretrained(str(folder))
        return ModelRef(str(folder.resolve()), ref.task, ref.num_labels, ref.init_seed), meta

    # ------------------------------------------------------------------ what the server received
    def client(
        self, server_round: int, node_id: int, reply: Mapping[str, torch.Tensor], num_examples: int | None
    ) -> None:
        """One client's reply: its update Δ = θ_sent − θ_reply as the setting's Observation."""
        ref, lmeta = self._refs[server_round]
        obs = Observation(
            model=ref,
            setting=self.run.setting,
            gradients=self._delta(server_round, reply),
            flags=self._flags(num_examples is not None),
            batch_size=int(num_examples) if num_examples is not None else None,
            meta={**self._meta(lmeta), "flower": {"round": server_round, "node_id": node_id}},
        )
        secret = self._secret(server_round, [node_id])
        self._capture(server_round, f"node-{node_id}", obs, secret)

    def aggregate(
        self, server_round: int, arrays: Mapping[str, torch.Tensor], examples: list[int] | None, clients: int
    ) -> None:
        """The new global weights: the (weighted) mean update of ``clients`` clients, a ``secagg`` Observation."""
        self.replies[server_round] = clients
        ref, lmeta = self._refs[server_round]
        inner = self._meta(lmeta)
        known = examples is not None
        meta = {
            "aggregation": "mean",
            "clients": clients,
            "inner_setting": self.run.setting,
            "client_batch_size": self.run.batch_size,
            "inner_meta": {k: v for k, v in inner.items() if k != "defenses"},
            **({"lora": lmeta} if lmeta else {}),
            **({"defenses": inner["defenses"]} if "defenses" in inner else {}),
            "flower": {"round": server_round, "aggregate": True},
            **known_noise(self.run, examples, clients),
        }
        obs = Observation(
            model=ref,
            setting="secagg",
            gradients=self._delta(server_round, arrays),
            flags=replace(self._flags(known), num_clients=clients),
            batch_size=int(sum(examples)) if known else None,
            meta=meta,
        )
        self._capture(server_round, "aggregate", obs, self._secret(server_round, None))

    def _delta(self, server_round: int, reply: Mapping[str, torch.Tensor]) -> Tensors:
        """θ_sent − θ_reply per tensor, in float64 (a reply, e.g. a SecAgg+ aggregate, may carry more precision
        than float32), stored as float32; each tensor of ``reply`` (e.g. :class:`RecordTensors`) read once."""
        out: Tensors = {}
        for k, sent in self._sent[server_round].items():
            theirs = reply[k].detach().double().reshape(sent.shape)
            out[k] = (sent.double() - theirs).float().contiguous()
        return out

    def _flags(self, batch_size_known: bool) -> ThreatFlags:
        return ThreatFlags(
            batch_size_known=batch_size_known, learning_rate=self.run.lr, local_steps=self.run.local_steps
        )

    def _meta(self, lmeta: dict[str, Any]) -> dict[str, Any]:
        meta: dict[str, Any] = {"padding": "right", "update": DELTA, "optimizer_steps": self.run.local_steps}
        if lmeta:
            meta["lora"] = lmeta
        if self.defenses:
            meta["defenses"] = list(self.defenses)
        return meta

    def _secret(self, server_round: int, nodes: list[int] | None) -> Secret | None:
        """The private batches of ``nodes`` (None: every client of the round), as the clients wrote them."""
        folder = self.secrets_dir / f"round-{server_round:03d}"
        files = sorted(folder.glob("node-*.json")) if nodes is None else [folder / f"node-{n}.json" for n in nodes]
        if not files or not all(f.exists() for f in files):
            return None
        data = [json.loads(f.read_text(encoding="utf-8")) for f in files]
        return Secret(
            tuple(t for d in data for t in d["texts"]),
            tuple(tuple(t) for d in data for t in d["token_ids"]),
            tuple(lab for d in data for lab in d["labels"]),
        )

    # ------------------------------------------------------------------ store and attack
    def _capture(self, server_round: int, who: str, obs: Observation, secret: Secret | None) -> None:
        from leaklab.threat.store import save_update

        path = self.out / f"round-{server_round:03d}" / f"{who}.safetensors"
        save_update(path, obs, secret)
        self.on_event("captured", {"round": server_round, "who": who, "path": str(path)})
        if not self._attack_this(server_round, who):
            return
        if self.defer:
            self.pending.append((server_round, who, path))
        else:
            self._attack(server_round, who, obs, secret)

    def _attack(self, server_round: int, who: str, obs: Observation, secret: Secret | None) -> None:
        for name in self.run.attack_list():
            self.records.append(attack_update(name, obs, secret, self.run.options_of(name), server_round, who))
            self.on_event("attacked", self.records[-1])
        atomic_write_json(self.out / "records.json", self.records)

    def attack_stored(self) -> None:
        """Attack the updates a deferred auditor stored, each read back from its file (after the federation, so
        the attacks do not share memory with Flower's copies of every reply); a round's global model is dropped
        once its updates are attacked."""
        from leaklab.models.registry import unload
        from leaklab.threat.lora import release as release_lora
        from leaklab.threat.store import load_secret, load_update

        self._sent, self._refs, self._model = {}, {}, None  # the federation's state: not needed by the attacks
        pending, self.pending = self.pending, []
        for i, (server_round, who, path) in enumerate(pending):
            obs = load_update(path, check_model=False)
            self._attack(server_round, who, obs, load_secret(path, obs))
            last_of_round = i + 1 == len(pending) or pending[i + 1][0] != server_round
            if last_of_round and obs.model.name != self.run.model:
                unload(obs.model)
            if last_of_round and "lora" in obs.meta:
                release_lora(obs.model, obs.meta["lora"])

    def _attack_this(self, server_round: int, who: str) -> bool:
        """Attack every aggregate (unless ``attack_aggregate`` is off), and the first ``attack_clients`` client
        updates of a round (0: all)."""
        if not self.attack:
            return False
        if who == "aggregate":
            return self.run.attack_aggregate
        chosen = self._chosen.setdefault(server_round, set())
        if self.run.attack_clients == 0 or who in chosen or len(chosen) < self.run.attack_clients:
            chosen.add(who)
            return True
        return False

    def _scratch_model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = copy.deepcopy(base_model(self.run.model, self.run.setting, self.run.lora_r))
        return self._model

    def validation(self, server_round: int, tensors: Tensors) -> float | None:
        """Mean next-token loss of the global weights on held-out public-split texts (the utility)."""
        if self.run.val_texts < 1:
            return None
        from leaklab.fl.model import load_tensors

        model = self._scratch_model()
        load_tensors(model, tensors)
        loss = validation_loss(model, self.run)
        self.utility[server_round] = loss
        self.on_event("utility", {"round": server_round, "val_loss": loss})
        return loss

    def close(self) -> None:
        if self._owns_out:
            shutil.rmtree(self.out, ignore_errors=True)


def known_noise(run: FlRun, examples: list[int] | None, clients: int) -> dict[str, float]:
    """The noise per entry that the run's Flower defense adds to the aggregate the auditor sees, which the server
    knows from the protocol parameters it set (``meta["delta_noise_std"]``; the delta denoiser adds it to σ).

    SecAgg+: each client's weights, scaled by w/max_weight, are stochastically rounded to steps of
    2·clipping_range/quantization_range (variance ≤ step²/4, step²/6 on average), and the server divides the sum
    by Σw: std ≈ step·max_weight/w/√6/√N. Server-side DP seen from outside: Flower adds N(0, (z·C/n)²) to the
    mean (n sampled clients); inside, the auditor sees the mean before the noise."""
    name, opts = defense_of(run.defense)
    if name == "secagg+":
        w = (sum(examples) / len(examples)) if examples else run.batch_size
        step = 2 * opts.clipping_range / opts.quantization_range
        return {"delta_noise_std": step * opts.max_weight / w / 6**0.5 / clients**0.5}
    if name == "server-dp" and opts.view in ("outside", "both"):
        return {"delta_noise_std": opts.noise * opts.clip / run.clients}
    return {}


def attack_update(
    name: str, obs: Observation, secret: Secret | None, options: dict[str, Any], server_round: int, who: str
) -> dict[str, Any]:
    """One attack on one captured update through leaklab's runner, as a record row."""
    from leaklab.experiments.runner import attack_batch, record_outcome

    row = attack_batch(name, obs, secret, options=options).to_dict()
    row.update({"round": server_round, "target": who, "outcome": record_outcome(row)})
    return row


def validation_loss(model: torch.nn.Module, run: FlRun) -> float:
    from leaklab.corpora import load_corpus, sample_texts
    from leaklab.threat.local import TextObjective, text_batch

    loaded = load_model(ModelRef(run.model))
    val = sample_texts(
        load_corpus(run.corpus),
        loaded.tokenizer,
        run.val_texts,
        run.seed + 7919,
        run.min_tokens,
        max(run.max_tokens, 32),
        split="public",
    )
    batch, _, _ = text_batch(loaded, val.texts, val.labels)
    with torch.no_grad():
        return float(TextObjective(batch, loaded.ref.task).mean_loss(model))


def _single(records: dict) -> Any:
    return next(iter(records.values())) if records else None


def _num_examples(msg: Message, key: str) -> int | None:
    metrics = _single(msg.content.metric_records)
    value = metrics.get(key) if metrics is not None else None
    return int(value) if value is not None else None


class ReleasingGrid:
    """``grid`` that drops the replies of its previous ``send_and_receive`` when the next one starts.

    Flower's ``Strategy.start`` keeps a round's reply list in a local variable until the next round's replies
    have all arrived, so the server held two rounds of client replies at once (with full-model replies: two
    models per client). No strategy uses a round's replies after aggregating them; this grid empties the list
    it returned (the caller's reference included) before sending the next round's messages."""

    def __init__(self, grid: Grid):
        self._grid = grid
        self._last: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        self._last.clear()
        self._last = list(self._grid.send_and_receive(messages, timeout=timeout))
        return self._last

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class RecordTensors(Mapping[str, torch.Tensor]):
    """The tensors of a Flower ArrayRecord, each deserialised when read: the auditor keeps the global weights
    Flower holds anyway instead of a copy of its own."""

    def __init__(self, record: ArrayRecord):
        self.record = record

    def __getitem__(self, key: str) -> torch.Tensor:
        return torch.from_numpy(np.array(self.record[key].numpy(), copy=True))

    def __iter__(self) -> Iterator[str]:
        return iter(self.record)

    def __len__(self) -> int:
        return len(self.record)


class AuditStrategy(Strategy):
    """Wrap ``strategy`` and hand the :class:`Auditor` the weights sent, each client's reply (``capture`` clients
    or both) and the aggregate (``capture`` aggregate or both). The federation itself is the inner strategy's."""

    def __init__(
        self, strategy: Strategy, auditor: Auditor, capture: str = "both", weighted_by_key: str = "num-examples"
    ):
        super().__init__()
        self.strategy = strategy
        self.auditor = auditor
        self.capture = capture
        self.weighted_by_key = weighted_by_key

    def __repr__(self) -> str:
        return f"AuditStrategy({self.strategy!r})"

    def summary(self) -> None:
        self.strategy.summary()

    def start(self, grid: Grid, *args: Any, **kwargs: Any) -> Any:
        """Flower's ``Strategy.start`` on a :class:`ReleasingGrid` (a round's replies are dropped before the next
        round's arrive)."""
        return super().start(ReleasingGrid(grid), *args, **kwargs)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.auditor.sent(server_round, RecordTensors(arrays))
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        self.auditor.replies[server_round] = len(replies)
        if self.capture in ("clients", "both"):
            for msg in replies:
                arrays = _single(msg.content.array_records)
                self.auditor.client(
                    server_round,
                    msg.metadata.src_node_id,
                    RecordTensors(arrays),
                    _num_examples(msg, self.weighted_by_key),
                )
        examples = [_num_examples(m, self.weighted_by_key) for m in replies]
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None and self.capture in ("aggregate", "both"):
            known = None if any(e is None for e in examples) else [int(e) for e in examples if e is not None]
            self.auditor.aggregate(server_round, RecordTensors(arrays), known, len(replies))
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def legacy_audit_strategy(strategy: Any, auditor: Auditor, names: list[str], secure: bool) -> Any:
    """The same audit around a legacy ``flwr.server.strategy.Strategy`` (the path Flower's SecAgg+ workflow
    and LocalDpMod still use in flwr 1.42). Under SecAgg+ (``secure``) every FitRes carries the unmasked
    aggregate only, so only the aggregate is captured; ``names`` orders the legacy parameter lists."""
    from flwr.common import parameters_to_ndarrays
    from flwr.server.strategy import Strategy as LegacyStrategy

    def tensors(parameters: Any) -> Tensors:
        arrays = parameters_to_ndarrays(parameters)
        return {n: torch.from_numpy(np.array(a, copy=True)) for n, a in zip(names, arrays, strict=True)}

    class LegacyAuditStrategy(LegacyStrategy):
        def __repr__(self) -> str:
            return f"AuditStrategy({strategy!r})"

        def initialize_parameters(self, client_manager):
            return strategy.initialize_parameters(client_manager)

        def configure_fit(self, server_round, parameters, client_manager):
            auditor.sent(server_round, tensors(parameters))
            return strategy.configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            auditor.replies[server_round] = len(results)
            if not secure and auditor.run.capture in ("clients", "both"):
                for proxy, res in results:
                    auditor.client(server_round, int(proxy.node_id), tensors(res.parameters), res.num_examples)
            parameters, metrics = strategy.aggregate_fit(server_round, results, failures)
            if parameters is not None and (secure or auditor.run.capture in ("aggregate", "both")):
                auditor.aggregate(server_round, tensors(parameters), [r.num_examples for _, r in results], len(results))
            return parameters, metrics

        def configure_evaluate(self, server_round, parameters, client_manager):
            return strategy.configure_evaluate(server_round, parameters, client_manager)

        def aggregate_evaluate(self, server_round, results, failures):
            return strategy.aggregate_evaluate(server_round, results, failures)

        def evaluate(self, server_round, parameters):
            return strategy.evaluate(server_round, parameters)

    return LegacyAuditStrategy()


def defense_record(run: FlRun) -> list[dict[str, Any]]:
    """What the Observations record about the run's Flower defense (ε where it can be computed)."""
    name, opts = defense_of(run.defense)
    if name == "none":
        return []
    row: dict[str, Any] = {"name": f"flower:{name}", **opts.to_dict()}
    if name == "local-dp":
        row["epsilon_per_round"] = opts.epsilon
    return [row]
