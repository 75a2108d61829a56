"""Typed options of a Flower run: the federation (:class:`FlRun`) and Flower's own defenses (:data:`FL_DEFENSES`).

A run travels as flat strings: the server reads it from the run config (``flwr run --run-config`` or the app's
``pyproject.toml``) and forwards the client's part in each round's train ``ConfigRecord``, so the same app runs
in simulation and in deployment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from leaklab.core import Config, NoOptions, Registry, option, parse_spec
from leaklab.errors import LeaklabError

SETTINGS = ("fedsgd", "fedavg", "lora")


@dataclass(frozen=True)
class FlRun(Config):
    """One federation: who trains what on which data, and what the auditor attacks."""

    model: str = option("tiny-llama", "packaged model, HF folder or hub name")
    corpus: str = option("rotten-tomatoes", "corpus whose private split the clients hold")
    clients: int = option(4, "clients (SuperNodes); all train every round")
    rounds: int = option(2, "federated rounds")
    batch_size: int = option(2, "texts per client per round (B)")
    setting: Literal["fedsgd", "fedavg", "lora"] = option("fedsgd", "what a client runs on its batch")
    lr: float = option(0.01, "client SGD learning rate η (FedSGD: one step θ − η·g)")
    local_steps: int = option(1, "local SGD passes (fedavg, lora)")
    lora_r: int = option(8, "LoRA rank r (lora)")
    min_tokens: int = option(4, "shortest private text, in tokens")
    max_tokens: int = option(10, "longest private text, in tokens")
    seed: int = option(0, "seed of the private shards")
    attacks: str = option("somp", "attacks the auditor runs, comma-separated (somp, dager, tokenset, ...)")
    attack_options: str = option("{}", "JSON: attack name -> options")
    attack_clients: int = option(0, "client updates attacked per round (0: all; the rest are stored only)")
    attack_aggregate: bool = option(True, "attack each round's aggregate (False: it is stored only)")
    attack_after: bool = option(
        True, "store updates while the federation runs and attack them afterwards (False: in-line, as captured)"
    )
    attack_budget_s: float = option(120.0, "time budget of each attack run (attacks with a budget_s option)")
    capture: Literal["clients", "aggregate", "both"] = option("both", "what the auditor captures each round")
    defense: str = option("none", "Flower defense: none, server-dp, local-dp or secagg+ (name:k=v,...)")
    val_texts: int = option(16, "public-split texts the server scores the global model on (0: none)")
    out: str = option("", "run folder (updates, secrets, records); empty: no files")

    def __post_init__(self) -> None:
        for name in ("clients", "rounds", "batch_size", "local_steps", "lora_r"):
            if getattr(self, name) < 1:
                raise LeaklabError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise LeaklabError(f"lr must be > 0, got {self.lr}")
        if self.setting == "fedsgd" and self.local_steps != 1:
            raise LeaklabError("fedsgd is one SGD step: use --setting fedavg for local steps")
        defense_of(self.defense)
        from leaklab.attacks.registry import attack_entry

        for name in self.attack_list():  # unknown names fail here, before any client trains
            attack_entry(name)

    def attack_list(self) -> list[str]:
        return [a.strip() for a in self.attacks.split(",") if a.strip()]

    def options_of(self, attack: str) -> dict[str, Any]:
        try:
            table = json.loads(self.attack_options or "{}")
        except json.JSONDecodeError as exc:
            raise LeaklabError(f"attack-options is not JSON: {exc}") from None
        opts = dict(table.get(attack, {}))
        from leaklab.attacks.registry import attack_entry

        if "budget_s" in attack_entry(attack).config.keys():  # noqa: SIM118  (a classmethod, not a dict)
            opts.setdefault("budget_s", self.attack_budget_s)
        return opts

    def client_config(self) -> dict[str, Any]:
        """What each client needs (nothing the auditor keeps: attacks, out)."""
        keep = ("model", "corpus", "clients", "rounds", "batch_size", "setting", "lr", "local_steps", "lora_r")
        return {k.replace("_", "-"): getattr(self, k) for k in (*keep, "min_tokens", "max_tokens", "seed")}

    @classmethod
    def from_run_config(cls, values: dict[str, Any]) -> FlRun:
        """From a Flower run config (``kebab-case`` keys, any scalar values)."""
        return cls.from_dict({k.replace("-", "_"): v for k, v in values.items()}, "fl run")


@dataclass(frozen=True)
class ServerDpOptions(Config):
    """Flower's DifferentialPrivacyServerSideFixedClipping: clip each update to C, add N(0, (z·C/n)²) to the mean."""

    noise: float = option(0.1, "noise multiplier z")
    clip: float = option(1.0, "clipping norm C of each update θ_sent − θ_reply")
    view: Literal["inside", "outside", "both"] = option(
        "inside",
        "inside: the auditor wraps the inner strategy (clipped updates, before noise); outside: it "
        "sees only the noised aggregate; both: one federation, client updates seen inside and the aggregate outside",
    )
    delta: float = option(1e-5, "δ at which Flower's RDP accountant reports ε")


@dataclass(frozen=True)
class LocalDpOptions(Config):
    """Flower's LocalDpMod: each client clips its update to C and adds Gaussian noise for (ε, δ) to its weights."""

    clip: float = option(1.0, "clipping norm C")
    sensitivity: float = option(1.0, "sensitivity Δ of the noise")
    epsilon: float = option(8.0, "ε per release")
    delta: float = option(1e-5, "δ per release")


@dataclass(frozen=True)
class SecAggPlusOptions(Config):
    """Flower's SecAgg+ (SecAggPlusWorkflow + secaggplus_mod): the server learns only the weighted sum."""

    shares: int = option(3, "key shares per client")
    threshold: int = option(2, "shares needed to reconstruct")
    clipping_range: float = option(8.0, "parameters are clipped to ±range before quantisation")
    quantization_range: int = option(2**22, "quantisation levels")
    max_weight: float = option(1000.0, "largest client weight (num-examples); parameters are scaled by w/max_weight")

    def __post_init__(self) -> None:
        if self.threshold > self.shares:
            raise LeaklabError(f"secagg+ threshold {self.threshold} exceeds shares {self.shares}")


FL_DEFENSES: Registry[str] = Registry("Flower defense", builtins=lambda: None)
FL_DEFENSES.register("none", "none", config=NoOptions, help="no defense: the server sees every client's update")
FL_DEFENSES.register("server-dp", "server", config=ServerDpOptions, help=ServerDpOptions.__doc__ or "")
FL_DEFENSES.register("local-dp", "client", config=LocalDpOptions, help=LocalDpOptions.__doc__ or "")
FL_DEFENSES.register("secagg+", "protocol", config=SecAggPlusOptions, help=SecAggPlusOptions.__doc__ or "")


def defense_of(spec: str) -> tuple[str, Config]:
    """``"server-dp:noise=0.5,view=outside"`` → (name, typed options); unknown names list the valid ones."""
    name, values = parse_spec(spec or "none", "defense option")
    return name, FL_DEFENSES.get(name).options(values)
