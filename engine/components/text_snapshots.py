"""Tiny random-init T5 and CLIP text snapshots, built offline from a word list.

Each builder writes a folder laid out like a Hugging Face snapshot (config.json, model.safetensors,
tokenizer.json + tokenizer_config.json) that `selfe.components.text_encoders` loads like the real ones. The
tokenizers are built with the `tokenizers` library in the same pipeline as the real ones (T5: Unigram +
Metaspace with the given words whole; CLIP: byte-level BPE with "</w>" word ends, spelled per character)
so nothing is downloaded. Weights are random (seeded, without touching the global RNG): the text states
are a fixed random function of the prompt, which a model trained on them can read. Used by the tests
and by ShapesEval (`selfe.shapes`), whose model ships with its two snapshots.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import torch

from selfe.components.text_encoders import quiet_transformers
from selfe.components.vocabulary import CLOSED_VOCABULARY_KEY

# Words a test prompt is likely to use; anything else still tokenizes (letters are in both vocabs).
DEFAULT_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "fake", "image", "on", "the", "table")
_CHARS = string.ascii_lowercase + string.digits + ",.!?'-"
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# The regex CLIP's tokenizer splits words with.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def t5_tokenizer(words: Sequence[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    # T5's order: pad 0, eos 1, unk 2. Whole words score higher than spelling them out.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -1.0) for word in words]
    vocab += [(char, -5.0) for char in _CHARS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    metaspace = {"replacement": "\u2581", "prepend_scheme": "always", "split": True}
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    tok.decoder = decoders.Metaspace(**metaspace)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def clip_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPTokenizerFast

    # Characters only (no merges): every word is spelled out, the last character carrying "</w>".
    vocab: dict[str, int] = {}
    for token in [*_CHARS, *(char + "</w>" for char in _CHARS), CLIP_BOS, CLIP_EOS]:
        vocab[token] = len(vocab)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[],
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=CLIP_EOS,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(
        (CLIP_EOS, vocab[CLIP_EOS]), (CLIP_BOS, vocab[CLIP_BOS]), trim_offsets=False, add_prefix_space=False
    )
    return CLIPTokenizerFast(
        tokenizer_object=tok, bos_token=CLIP_BOS, eos_token=CLIP_EOS, pad_token=CLIP_EOS, unk_token=CLIP_EOS
    )


@quiet_transformers()
def make_t5_snapshot(
    directory: str | Path,
    *,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    words: Sequence[str] = DEFAULT_WORDS,
    seed: int = 0,
    order_bias: float = 0.0,
    closed_vocabulary: bool = False,
) -> Path:
    """A random T5 v1.1-style encoder (gated-gelu) with its tokenizer, saved under `directory`.

    order_bias > 0 sets the relative-position bias so that the heads look at fixed relative positions
    (see `_bias_heads_to_word_order`); 0 leaves T5's random initialisation.
    closed_vocabulary: declare `words` the only ones a model trained on this encoder knows (config.json's
    `selfe_closed_vocabulary`): the pipeline then warns about prompts with other words
    (`selfe.components.vocabulary`). Off for the tests' snapshots, whose word list is only a convenience.
    """
    from transformers import T5Config, T5EncoderModel

    directory = Path(directory)
    tokenizer = t5_tokenizer(words)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
        **({CLOSED_VOCABULARY_KEY: True} if closed_vocabulary else {}),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config).eval()
    if order_bias:
        _bias_heads_to_word_order(model, order_bias)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# Relative positions (key - query) each head of an order-biased T5 attends to, cycled over the heads.
_ORDER_HEAD_OFFSETS = ((-1,), (1,), tuple(range(-31, -1)), tuple(range(2, 32)))


def _bias_heads_to_word_order(model, strength: float) -> None:
    """Make each head attend to one relative position: the previous word, the next, all before, all after.

    A random T5's attention is near uniform, so its token states are a bag of words: swapping the two
    colours of "a red circle to the left of a blue square" moves the state of "circle" by ~5%, and an MMDiT
    (whose text tokens carry no position) can hardly read from them which colour goes with which shape, or
    which object comes first. A trained T5 encodes word order in its states; this bias gives the random one
    that property (the state of "circle" then carries "red" and what follows it) while the weights stay random.
    """
    from transformers.models.t5.modeling_t5 import T5Attention

    attention = model.encoder.block[0].layer[0].SelfAttention  # T5 shares layer 0's bias with every layer
    config = model.config
    table = torch.zeros_like(attention.relative_attention_bias.weight)  # (buckets, heads)
    for head in range(config.num_heads):
        offsets = torch.tensor(_ORDER_HEAD_OFFSETS[head % len(_ORDER_HEAD_OFFSETS)])
        buckets = T5Attention._relative_position_bucket(
            offsets,
            bidirectional=True,
            num_buckets=config.relative_attention_num_buckets,
            max_distance=config.relative_attention_max_distance,
        )
        table[buckets.unique(), head] = strength
    with torch.no_grad():
        attention.relative_attention_bias.weight.copy_(table)


@quiet_transformers()
def make_clip_snapshot(
    directory: str | Path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 77,
    seed: int = 0,
) -> Path:
    """A random CLIP text model with its tokenizer, saved under `directory`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    directory = Path(directory)
    tokenizer = clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
