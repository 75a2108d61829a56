"""Text sources: packaged corpora, user files, Hugging Face datasets (online); seeded, length-selected."""

from leaklab.corpora.registry import CORPORA, Corpus, corpus_names, describe_corpora, load_corpus
from leaklab.corpora.sampling import Sample, sample_texts, split_of

__all__ = [
    "CORPORA",
    "Corpus",
    "Sample",
    "corpus_names",
    "describe_corpora",
    "load_corpus",
    "sample_texts",
    "split_of",
]
