"""Victim side, secure aggregation: the server sees only the sum (or mean) of N clients' updates.

Each client runs the inner setting (fedsgd, fedavg, lora, dpo or reward) on its own private batch; a
SecAgg protocol reveals only Σ_c u_c (``reduce="sum"``) or (1/N)·Σ_c u_c (``"mean"``, FedAvg's weighting for
equal batches). The Secret is every client's texts, so recovery is scored against the whole population.
Client-side defenses (DP-SGD, frozen embeddings) run inside each client; the others act on the aggregate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from leaklab.errors import LeaklabError, UnknownNameError
from leaklab.threat.observation import Observation, Secret, ThreatFlags

REDUCTIONS = ("mean", "sum")
ClientFn = Callable[[list[str], list[int] | None, ThreatFlags, int], tuple[Observation, Secret]]


def split_clients(texts: list[str], clients: int) -> list[slice]:
    """Equal consecutive shares of the texts, one per client."""
    if clients < 1:
        raise LeaklabError(f"secure aggregation needs at least one client, got {clients}")
    if len(texts) % clients:
        raise LeaklabError(f"{len(texts)} texts cannot be split evenly over {clients} clients")
    size = len(texts) // clients
    return [slice(c * size, (c + 1) * size) for c in range(clients)]


def secagg_update(
    client_fn: ClientFn,
    texts: list[str],
    labels: list[int] | None,
    flags: ThreatFlags,
    seed: int,
    clients: int,
    inner: str,
    reduce: str = "mean",
) -> tuple[Observation, Secret]:
    """Aggregate ``clients`` updates of ``client_fn`` (client c gets the c-th share of ``texts`` and seed
    ``seed + c``) into one Observation of setting ``secagg``."""
    if reduce not in REDUCTIONS:
        raise UnknownNameError("aggregation", reduce, list(REDUCTIONS))
    if inner == "secagg":
        raise LeaklabError("the inner setting of secure aggregation cannot itself be secagg")
    client_flags = replace(flags, num_clients=1)
    total: dict | None = None
    secrets: list[Secret] = []
    first: Observation | None = None
    for c, share in enumerate(split_clients(texts, clients)):
        obs, secret = client_fn(texts[share], labels[share] if labels is not None else None, client_flags, seed + c)
        first = first or obs
        secrets.append(secret)
        total = dict(obs.gradients) if total is None else {k: total[k] + obs.gradients[k] for k in total}
    assert total is not None and first is not None
    if reduce == "mean":
        total = {k: v / clients for k, v in total.items()}
    inner_meta = {k: v for k, v in first.meta.items() if k != "defenses"}
    per_client = first.batch_size if first.batch_size is not None else len(secrets[0])
    meta = {
        "aggregation": reduce,
        "clients": clients,
        "inner_setting": inner,
        "client_batch_size": per_client,
        "inner_meta": inner_meta,
        **({"lora": inner_meta["lora"]} if "lora" in inner_meta else {}),
        **(
            {"defenses": [{**r, "per_client": True} for r in first.meta["defenses"]]}
            if "defenses" in first.meta
            else {}
        ),
    }
    agg_flags = replace(flags, num_clients=clients)
    obs = Observation(
        model=first.model,
        setting="secagg",
        gradients=total,
        flags=agg_flags,
        batch_size=per_client * clients if agg_flags.batch_size_known else None,
        labels=tuple(lab for s in secrets for lab in s.labels) if agg_flags.labels_known else None,
        lengths=tuple(n for s in secrets for n in s.lengths) if agg_flags.lengths_known else None,
        meta=meta,
    )
    secret = Secret(
        tuple(t for s in secrets for t in s.texts),
        tuple(t for s in secrets for t in s.token_ids),
        tuple(lab for s in secrets for lab in s.labels),
    )
    return obs, secret
