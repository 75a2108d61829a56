"""Tiny random-init models of every Hugging Face family the adapters cover, built offline from each family's
transformers config (2 layers, width 64) with a small word-level tokenizer, saved as a model folder."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "roof",
    "river",
    "bank",
    "quiet",
    "evening",
    "morning",
    "rain",
    "fell",
    "old",
    "new",
    "small",
    "big",
    "red",
    "green",
    "house",
    "garden",
    "window",
    "bridge",
    "candle",
    "meadow",
    "harbor",
    "forest",
    "tower",
    "stood",
    "walked",
    "near",
    "far",
    "today",
    "slowly",
    "bright",
    "cold",
    "warm",
    "light",
    "dark",
    "stone",
    "road",
    "wind",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
WIDTH, HEADS, LAYERS, FFN = 64, 4, 2, 128


def word_tokenizer(folder: Path):
    """A word-level fast tokenizer over :data:`WORDS` (decoding joins words with spaces)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIALS, *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="<s>",
        eos_token="</s>",
    )
    tok.save_pretrained(str(folder))
    return tok


def _common(tok) -> dict:
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    return {"vocab_size": len(tok), **ids}


def _decoder_configs(tok) -> dict:
    import transformers as tf

    c = _common(tok)
    rope = {"hidden_size": WIDTH, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "intermediate_size": FFN}
    return {
        "llama": lambda: tf.LlamaConfig(**rope, num_key_value_heads=2, **c),
        "mistral": lambda: tf.MistralConfig(**rope, num_key_value_heads=2, **c),
        "qwen2": lambda: tf.Qwen2Config(**rope, num_key_value_heads=2, **c),
        "gemma": lambda: tf.GemmaConfig(**rope, num_key_value_heads=1, head_dim=WIDTH // HEADS, **c),
        "phi": lambda: tf.PhiConfig(**rope, **c),
        "gpt2": lambda: tf.GPT2Config(n_embd=WIDTH, n_head=HEADS, n_layer=LAYERS, n_positions=128, **c),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**rope, max_position_embeddings=128, **c),
        "opt": lambda: tf.OPTConfig(
            hidden_size=WIDTH,
            num_attention_heads=HEADS,
            num_hidden_layers=LAYERS,
            ffn_dim=FFN,
            word_embed_proj_dim=WIDTH,
            max_position_embeddings=128,
            **c,
        ),
    }


def _encoder_configs(tok) -> dict:
    import transformers as tf

    c = _common(tok)
    bert = {"hidden_size": WIDTH, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "intermediate_size": FFN}
    return {
        "bert": lambda: tf.BertConfig(**bert, max_position_embeddings=128, **c),
        "roberta": lambda: tf.RobertaConfig(**bert, max_position_embeddings=130, **c),
        "xlm-roberta": lambda: tf.XLMRobertaConfig(**bert, max_position_embeddings=130, **c),
        "mpnet": lambda: tf.MPNetConfig(**bert, max_position_embeddings=130, **c),
        "distilbert": lambda: tf.DistilBertConfig(
            dim=WIDTH, n_heads=HEADS, n_layers=LAYERS, hidden_dim=FFN, max_position_embeddings=128, **c
        ),
    }


DECODERS = ("llama", "mistral", "qwen2", "gemma", "phi", "gpt2", "gpt_neox", "opt")
ENCODERS = ("bert", "roberta", "distilbert", "mpnet", "xlm-roberta")


def build_family(name: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random-init ``name`` model (causal LM for decoders, the bare encoder otherwise) and its
    tokenizer to ``folder``."""
    from transformers import AutoModel, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = word_tokenizer(folder)
    decoders, encoders = _decoder_configs(tok), _encoder_configs(tok)
    cfg = (decoders | encoders)[name]()
    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if name in decoders else AutoModel
    cls.from_config(cfg).save_pretrained(str(folder))
    return folder
