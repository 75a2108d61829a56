"""Victim side of the planted-secrets scenario: a knowledge base (KB) of corpus documents into which secret
records are planted from templates an attacker may know.

A template is a sentence with slots: ``{name}``, ``{condition}``, ``{team}``, ``{word}`` (each a packaged
public list of :data:`SLOT_LISTS`) and ``{digits:L}`` (L random digits). A slot space repeated in one
template (``{word} {word}``) is one slot per occurrence. The planted values are the :class:`PlantedSecret`
records: for scoring only, never handed to an attack.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from leaklab.errors import LeaklabError, UnknownNameError

SLOT_DIR = Path(__file__).with_name("slots")
SLOT_LISTS = ("name", "condition", "team", "word")
TEMPLATES = {
    "pin": "The PIN of account {name} is {digits:4}.",
    "diagnosis": "{name} was diagnosed with {condition}.",
    "vpn": "The VPN password for {team} is {word} {word}.",
}


@cache
def slot_list(space: str) -> tuple[str, ...]:
    """The packaged public candidate list of a slot space (one value a line)."""
    if space not in SLOT_LISTS:
        raise UnknownNameError("slot list", space, list(SLOT_LISTS))
    lines = (SLOT_DIR / f"{space}s.txt").read_text(encoding="utf-8").splitlines()
    return tuple(v.strip() for v in lines if v.strip())


@dataclass(frozen=True)
class Slot:
    """One slot of a template: its key (``word``, ``word2`` for a repeat), space and, for digits, its length."""

    key: str
    space: str
    digits: int = 0

    @property
    def kind(self) -> str:
        """The slot type reported per result: ``digits4``, ``name``, ..."""
        return f"digits{self.digits}" if self.digits else self.space


@dataclass(frozen=True)
class Template:
    """A sentence with slots; ``fill`` renders it from a value per slot key."""

    text: str
    slots: tuple[Slot, ...]
    parts: tuple[str, ...]  # literal text around the slots: len(parts) == len(slots) + 1

    @classmethod
    def parse(cls, text: str) -> Template:
        """Parse ``{space}`` / ``{digits:L}`` fields; a template without a slot or with an unknown one is refused."""
        parts, slots, seen = [], [], {}
        try:
            fields = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise LeaklabError(f"template {text!r}: {exc}") from None
        literal = ""
        for lit, name, spec, _ in fields:
            literal += lit
            if name is None:
                continue
            if name == "digits":
                if not spec.isdigit() or not 1 <= int(spec) <= 8:
                    raise LeaklabError(f"template {text!r}: digits slots are written {{digits:L}} with L in 1..8")
                digits = int(spec)
            elif name in SLOT_LISTS:
                digits = 0
            else:
                raise UnknownNameError(f"slot in template {text!r}", name, [*SLOT_LISTS, "digits:L"])
            seen[name] = seen.get(name, 0) + 1
            key = name if seen[name] == 1 else f"{name}{seen[name]}"
            slots.append(Slot(key, name, digits))
            parts.append(literal)
            literal = ""
        parts.append(literal)
        if not slots:
            raise LeaklabError(f"template {text!r} has no slot: write slots as {{name}}, {{digits:4}}, ...")
        return cls(text, tuple(slots), tuple(parts))

    def fill(self, values: Mapping[str, str]) -> str:
        """The sentence with each slot's value (an empty value leaves the slot blank)."""
        out = self.parts[0]
        for slot, lit in zip(self.slots, self.parts[1:], strict=True):
            out += values.get(slot.key, "") + lit
        return " ".join(out.split())


def template_of(name_or_text: str) -> Template:
    """A packaged template by name (``pin``, ``diagnosis``, ``vpn``) or a template text with slots."""
    if name_or_text in TEMPLATES:
        return Template.parse(TEMPLATES[name_or_text])
    if "{" not in name_or_text:
        raise LeaklabError(
            f"template {name_or_text!r} has no slot and is no packaged template ({', '.join(TEMPLATES)})"
        )
    return Template.parse(name_or_text)


def candidates_of(slot: Slot, lists: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """The candidate values of a slot: ``lists[space]`` if given, else the packaged list; all L-digit strings for
    a digits slot. An empty list is refused."""
    if slot.digits:
        return [f"{i:0{slot.digits}d}" for i in range(10**slot.digits)]
    values = list(lists[slot.space]) if lists and slot.space in lists else list(slot_list(slot.space))
    values = [v for v in dict.fromkeys(v.strip() for v in values) if v]
    if not values:
        raise LeaklabError(f"slot {{{slot.space}}} has an empty candidate list")
    return values


@dataclass(frozen=True)
class PlantedSecret:
    """One planted record: where it sits in the KB, its template and slot values (scoring only)."""

    doc_id: str
    template: str
    values: tuple[tuple[str, str], ...]  # (slot key, value)

    def value(self, key: str) -> str:
        return dict(self.values)[key]


@dataclass(frozen=True)
class PlantedKB:
    """The victim's documents (ids ``doc-i``) with the planted records among them, and the planted secrets."""

    docs: tuple[str, ...]
    ids: tuple[str, ...]
    secrets: tuple[PlantedSecret, ...]

    def write(self, path: str | Path) -> Path:
        """One document a line (the service's ``search.corpus`` file; ids are ``doc-<line>``), atomically."""
        from leaklab.io import atomic_write_text

        return atomic_write_text(Path(path), "\n".join(self.docs) + "\n")


def plant_secrets(
    base_docs: Sequence[str],
    templates: Sequence[str],
    n_secrets: int,
    seed: int,
    lists: Mapping[str, Sequence[str]] | None = None,
) -> PlantedKB:
    """``n_secrets`` records, spread round-robin over ``templates``, slot values drawn uniformly (without repeats
    within a slot while its list lasts), inserted at random positions among ``base_docs``."""
    if n_secrets < 1:
        raise LeaklabError(f"plant at least one secret (got {n_secrets})")
    parsed = [template_of(t) for t in templates]
    if not parsed:
        raise LeaklabError("no template to plant secrets from")
    rng = np.random.default_rng(seed)
    records: list[tuple[str, Template, dict[str, str]]] = []
    pools: dict[tuple[int, str], list[str]] = {}
    for i in range(n_secrets):
        t = parsed[i % len(parsed)]
        values = {}
        for slot in t.slots:
            if slot.digits:
                values[slot.key] = "".join(str(d) for d in rng.integers(0, 10, slot.digits))
                continue
            pool = pools.setdefault((i % len(parsed), slot.key), [])
            if not pool:
                pool.extend(rng.permutation(candidates_of(slot, lists)).tolist())
            values[slot.key] = pool.pop()
        records.append((templates[i % len(parsed)], t, values))
    base = [d for d in dict.fromkeys(" ".join(d.split()) for d in base_docs) if d]
    texts = [t.fill(v) for _, t, v in records]
    base = [d for d in base if d not in set(texts)]
    slots_at = np.sort(rng.choice(len(base) + n_secrets, size=n_secrets, replace=False))
    docs: list[str] = []
    secrets: list[PlantedSecret] = []
    rec_iter, base_iter = iter(zip(records, texts, strict=True)), iter(base)
    planted = set(slots_at.tolist())
    for pos in range(len(base) + n_secrets):
        if pos in planted:
            (name, _, values), text = next(rec_iter)
            secrets.append(PlantedSecret(f"doc-{pos}", name, tuple(values.items())))
            docs.append(text)
        else:
            docs.append(next(base_iter))
    if len(set(docs)) != len(docs):
        raise LeaklabError("two planted records coincide: plant fewer secrets or use longer candidate lists")
    return PlantedKB(tuple(docs), tuple(f"doc-{i}" for i in range(len(docs))), tuple(secrets))
