"""Every Hugging Face family through the family adapters: a tiny random-init model of each (built offline
from its transformers config) gives up a B=2 batch to DAGER and SOMP exactly, with every attack tensor placed
on the model's device; a family the adapters cannot read fails with one line naming the missing piece."""

from __future__ import annotations

import contextlib

import pytest
from device_guard import unplaced_tensors_fail
from families import DECODERS, ENCODERS, build_family

from leaklab.experiments.runner import attack_batch
from leaklab.models import ModelRef
from leaklab.threat.fedsgd import fedsgd_update

TEXTS = ["the cat sat on the old mat today", "a quiet evening near the river bank"]
OPTIONS = {"somp": {"max_atoms": 64}, "dager": {}}
#: transformers' own sliding-window cache builds a tensor on the default device and then moves it: the guard
#: that sends unplaced tensors to meta cannot run there (the attacks run unguarded)
UNGUARDED = {"mistral"}


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return lambda name: build_family(name, root / name)


@pytest.mark.parametrize("family", DECODERS + ENCODERS)
@pytest.mark.parametrize("attack", ["dager", "somp"])
def test_family_b2_exact(family_dir, family, attack):
    task = "next-token" if family in DECODERS else "classify"
    ref = ModelRef(str(family_dir(family)), task)
    obs, secret = fedsgd_update(ref, TEXTS, [0, 1])
    with contextlib.nullcontext() if family in UNGUARDED else unplaced_tensors_fail():
        record = attack_batch(attack, obs, secret, options=OPTIONS[attack])
    assert record.status == "recovered", record.reason
    assert record.aggregate["rouge1"] == 1.0, record.recovered


def test_unreadable_family_fails_with_one_line():
    """A model whose blocks hold no recognisable attention projections: one line naming the missing piece."""
    from torch import nn
    from transformers import PretrainedConfig

    from leaklab.errors import LeaklabError
    from leaklab.models import FamilyAdapter

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = PretrainedConfig(hidden_size=8, num_attention_heads=2, model_type="odd")
            self.embed = nn.Embedding(10, 8)
            self.blocks = nn.ModuleList([Block(), Block()])

        def get_input_embeddings(self) -> nn.Embedding:
            return self.embed

    with pytest.raises(LeaklabError, match=r"cannot find attention projections in block blocks\.0 \(Block\)") as err:
        FamilyAdapter(Odd())
    assert "\n" not in str(err.value)


def test_folder_tokenizer_keeps_the_folders_tokenizer_model(tmp_path):
    """transformers rebuilds a Qwen2 folder's tokenizer as BPE from its vocabulary; a word-level
    tokenizer.json would then map every word to one id. The loader keeps the file's own tokenizer model."""
    from families import _decoder_configs, word_tokenizer

    from leaklab.models.registry import folder_tokenizer

    tok = word_tokenizer(tmp_path)
    _decoder_configs(tok)["qwen2"]().save_pretrained(str(tmp_path))
    loaded = folder_tokenizer(str(tmp_path))
    assert loaded(TEXTS[0])["input_ids"] == tok(TEXTS[0])["input_ids"]
    assert len(set(loaded(TEXTS[0])["input_ids"])) == 7
