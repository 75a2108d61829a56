"""leaklab: measure how much private text leaks from shared gradients, adapter updates and embeddings.

The public API (``leaklab.__all__``)::

    import leaklab
    obs = leaklab.observation_from_gradients("./my-model", grads, batch_size=2)
    rec = leaklab.attack("somp", obs)
    print(rec.texts, leaklab.score(obs, private_texts, rec))

Names load on first use, so ``import leaklab`` stays light.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("leaklab")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

#: public name → the module that defines it
_API: dict[str, str] = {
    # the threat-model contract
    "ModelRef": "leaklab.models.registry",
    "Observation": "leaklab.threat.observation",
    "Secret": "leaklab.threat.observation",
    "ThreatFlags": "leaklab.threat.observation",
    "observation_from_gradients": "leaklab.api",
    "secret_from_texts": "leaklab.api",
    # attacks, scoring and the runner
    "attack": "leaklab.api",
    "score": "leaklab.api",
    "run": "leaklab.api",
    "attacks": "leaklab.api",
    "settings": "leaklab.api",
    "Recovery": "leaklab.attacks.base",
    "RunRecord": "leaklab.experiments.runner",
    "run_embedding": "leaklab.experiments.runner",
    "make_attack": "leaklab.attacks.base",
    "register_gradient_attack": "leaklab.attacks.base",
    "Config": "leaklab.core.config",
    "option": "leaklab.core.config",
    # victim updates for each setting
    "fedsgd_update": "leaklab.threat.fedsgd",
    "client_update": "leaklab.threat.settings",
    "make_update": "leaklab.threat.settings",
    "sample_update": "leaklab.threat.settings",
    "load_update": "leaklab.threat.store",
    "save_update": "leaklab.threat.store",
    "load_secret": "leaklab.threat.store",
    # defenses
    "make_defense": "leaklab.defenses",
    "apply_defenses": "leaklab.defenses",
    "defended_update": "leaklab.defenses",
    "defense_names": "leaklab.defenses",
    # errors
    "LeaklabError": "leaklab.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'leaklab' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
