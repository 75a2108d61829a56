"""What a membership attacker holds: the fine-tuned model (always), and, only where the threat model grants
them, the base model it was fine-tuned from and public texts of the same distribution. Each grant is a recorded
flag; an attack that needs a missing grant cannot run. Forward passes are cached per (model, text), so running
every attack costs one pass per model and text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leaklab.attacks.base import CannotRun
from leaklab.errors import LeaklabError
from leaklab.models.causal import CausalLM, TokenStats, same_tokenizer, token_stats


@dataclass(frozen=True)
class Grants:
    """Knowledge beyond black-box scoring of the fine-tuned model; recorded with every result."""

    base_model: bool = False
    public_data: bool = False

    def to_dict(self) -> dict[str, bool]:
        return {"base_model": self.base_model, "public_data": self.public_data}


@dataclass
class LMAccess:
    """The attacker's view. ``shadow_dir`` caches shadow models trained on the public texts."""

    target: CausalLM
    base: CausalLM | None = None
    public: tuple[str, ...] | None = None
    shadow_dir: Path | None = None
    batch_size: int = 32
    _stats: dict[tuple[int, str], TokenStats] = field(default_factory=dict, repr=False)
    _models: dict[str, CausalLM] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.base is not None and not same_tokenizer(self.target, self.base):
            raise LeaklabError(
                f"base model '{self.base.name}' has another tokenizer than '{self.target.name}': "
                "it cannot be the model this one was fine-tuned from"
            )
        if self.public is not None and not self.public:
            raise LeaklabError("the public data grant holds no text")

    @property
    def grants(self) -> Grants:
        return Grants(self.base is not None, self.public is not None)

    def need_base(self, who: str) -> CausalLM:
        if self.base is None:
            raise CannotRun(f"{who} needs the base model (grant it with --base)")
        return self.base

    def need_public(self, who: str) -> tuple[str, ...]:
        if self.public is None:
            raise CannotRun(f"{who} needs public texts of the same distribution (grant them with --public)")
        return self.public

    def stats(self, lm: CausalLM, texts: Sequence[str]) -> list[TokenStats]:
        """Token statistics of ``texts`` under ``lm``, computing only the texts not seen before."""
        key = id(lm.model)
        todo = list(dict.fromkeys(t for t in texts if (key, t) not in self._stats))
        if todo:
            for t, s in zip(todo, token_stats(lm, todo, self.batch_size), strict=True):
                self._stats[(key, t)] = s
        return [self._stats[(key, t)] for t in texts]

    def known(self, lm: CausalLM) -> dict[str, TokenStats]:
        """The token statistics computed so far under ``lm``, by text."""
        key = id(lm.model)
        return {t: s for (k, t), s in self._stats.items() if k == key}

    def learn(self, lm: CausalLM, stats: dict[str, TokenStats]) -> None:
        """Adopt statistics computed under this same ``lm`` object elsewhere (e.g. the base model shared by several
        fine-tunes' accesses), so they are not computed again."""
        self._stats.update({(id(lm.model), t): s for t, s in stats.items()})

    def record(self) -> dict[str, Any]:
        return {
            "target": self.target.name,
            "base": self.base.name if self.base is not None else None,
            "public_texts": len(self.public) if self.public is not None else 0,
            "grants": self.grants.to_dict(),
        }
