"""leaklab's Flower ServerApp: FedAvg over the run's clients, wrapped by AuditStrategy and Flower's defense.

``none`` and ``server-dp`` use the Message API (``flwr.serverapp.strategy``); ``server-dp`` with view
``inside`` wraps the auditing strategy in ``DifferentialPrivacyServerSideFixedClipping`` (the auditor sees
each clipped update before noise), with view ``outside`` the other way round (it sees only the noised
aggregate), with view ``both`` at both places of one federation. ``local-dp`` and ``secagg+`` use the legacy
path, the only one Flower's LocalDpMod and SecAgg+ support in flwr 1.42: ``DefaultWorkflow`` (with
``SecAggPlusWorkflow`` as the fit workflow for secagg+) over the legacy FedAvg.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy

from leaklab.fl.audit import (
    Auditor,
    AuditStrategy,
    RecordTensors,
    ReleasingGrid,
    defense_record,
    legacy_audit_strategy,
)
from leaklab.fl.config import FlRun, defense_of
from leaklab.fl.model import base_model, shared_names, tensors_of


def train_config(run: FlRun, auditor: Auditor) -> dict[str, Any]:
    return {**run.client_config(), "secrets-dir": str(auditor.secrets_dir.resolve()), "defense": run.defense}


def message_strategy(run: FlRun, auditor: Auditor) -> Strategy:
    """FedAvg over every client, audited; server-side DP around or inside the audit."""
    fedavg = FedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=run.clients, min_available_nodes=run.clients
    )
    name, opts = defense_of(run.defense)
    if name != "server-dp":
        return AuditStrategy(fedavg, auditor, run.capture)
    dp = {"noise_multiplier": opts.noise, "clipping_norm": opts.clip, "num_sampled_clients": run.clients}
    if opts.view == "inside":
        return DifferentialPrivacyServerSideFixedClipping(AuditStrategy(fedavg, auditor, run.capture), **dp)
    if opts.view == "both":  # one federation seen from both places: the clipped updates and the noised mean
        inside = DifferentialPrivacyServerSideFixedClipping(AuditStrategy(fedavg, auditor, "clients"), **dp)
        return AuditStrategy(inside, auditor, "aggregate")
    return AuditStrategy(DifferentialPrivacyServerSideFixedClipping(fedavg, **dp), auditor, "aggregate")


def run_federation(grid: Grid, context: Context, run: FlRun, auditor: Auditor) -> None:
    """Run ``run.rounds`` rounds on ``grid`` with the auditor capturing (and attacking) every round."""
    auditor.defenses = defense_record(run)
    grid = ReleasingGrid(grid)  # type: ignore[assignment]
    model = base_model(run.model, run.setting, run.lora_r)
    name, _ = defense_of(run.defense)
    if name in ("secagg+", "local-dp"):
        _run_legacy(grid, context, run, auditor, shared_names(model), name == "secagg+")
        return

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        loss = auditor.validation(server_round, RecordTensors(arrays))
        return MetricRecord({"val-loss": loss}) if loss is not None else None

    message_strategy(run, auditor).start(
        grid,
        ArrayRecord(tensors_of(model)),
        num_rounds=run.rounds,
        train_config=ConfigRecord(train_config(run, auditor)),
        evaluate_fn=evaluate,
    )


def _run_legacy(grid: Grid, context: Context, run: FlRun, auditor: Auditor, names: list[str], secure: bool) -> None:
    import torch
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    model = base_model(run.model, run.setting, run.lora_r)
    initial = ndarrays_to_parameters([p.detach().numpy() for n, p in model.named_parameters() if n in names])

    def evaluate(server_round: int, ndarrays, config):
        tensors = {n: torch.from_numpy(a.copy()) for n, a in zip(names, ndarrays, strict=True)}
        loss = auditor.validation(server_round, tensors)
        return (loss, {}) if loss is not None else None

    fedavg = LegacyFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=run.clients,
        min_available_clients=run.clients,
        initial_parameters=initial,
        evaluate_fn=evaluate,
        on_fit_config_fn=lambda r: {**train_config(run, auditor), "server-round": r},
    )
    strategy = legacy_audit_strategy(fedavg, auditor, names, secure)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=run.rounds), strategy=strategy)
    fit = None
    if secure:
        _, opts = defense_of(run.defense)
        fit = SecAggPlusWorkflow(
            opts.shares,
            opts.threshold,
            clipping_range=opts.clipping_range,
            quantization_range=opts.quantization_range,
            max_weight=opts.max_weight,
        )
    DefaultWorkflow(fit_workflow=fit)(grid, legacy)


def make_server_app(run: FlRun, auditor: Auditor) -> ServerApp:
    """A ServerApp bound to ``run`` and ``auditor`` (the simulation keeps both in this process)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, context, run, auditor)

    return app


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point: the run comes from the run config (``flwr run --run-config``)."""
    import time
    from pathlib import Path

    from leaklab.fl.report import summarise_run, write_run_folder

    run = FlRun.from_run_config(dict(context.run_config))
    auditor = Auditor(run, run.out or None, defer=run.attack_after)
    start = time.perf_counter()
    try:
        run_federation(grid, context, run, auditor)
        auditor.attack_stored()
        if run.out:
            write_run_folder(Path(run.out), summarise_run(run, auditor, time.perf_counter() - start))
    finally:
        auditor.close()
