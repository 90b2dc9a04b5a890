"""A tiny, randomly initialised Qwen2-Audio with a real (trained in-process) tokenizer.

It has the exact architecture and processor of Qwen2-Audio-7B-Instruct at a toy size, so the whole
pipeline (prompts, audio merge, rollout, log-probs, LoRA, checkpoints) runs on a CPU in seconds and
offline. Nothing is downloaded: the tokenizer is a byte-level BPE trained on a built-in corpus.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
AUDIO_SPECIAL_TOKENS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
MEL_FRAMES_PER_SECOND = 100  # WhisperFeatureExtractor: hop 160 at 16 kHz

# Same pre-tokenisation as the real Qwen2 tokenizer, so the tiny one splits text the same way.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2-Audio-7B-Instruct's template, also accepting {"type": "audio"} parts without an "audio" key.
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
    "{% if content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
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


def _has_model(out_dir: Path) -> bool:
    return (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors"))


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
    """Build, save and return the directory of a tiny random Qwen2-Audio + processor.

    Shapes: audio encoder d_model 64, ``encoder_layers`` layers, 4 heads, ffn 128; text model
    ``num_layers`` layers, hidden ``hidden_size``, 4 heads, 2 KV heads, intermediate 2*hidden.
    The encoder needs exactly ``2 * max_source_positions`` mel frames, and the feature extractor pads to
    ``100 * chunk_length`` frames, so ``max_source_positions = 50 * chunk_length``; one ``<|AUDIO|>``
    then expands to ``((L - 1) // 2 + 1 - 2) // 2 + 1`` tokens for L valid mel frames.

    Deterministic for a seed. If ``out_dir`` already holds a model and not ``overwrite``, it is returned
    unchanged.
    """
    from transformers import (
        GenerationConfig,
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    out_dir = Path(out_dir)
    if _has_model(out_dir) and not overwrite:
        return out_dir
    if chunk_length < 1:
        raise ValueError(f"chunk_length must be a positive number of seconds, got {chunk_length}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size must be divisible by the 4 attention heads, got {hidden_size}")
    if out_dir.exists() and overwrite:
        shutil.rmtree(out_dir)

    tokenizer = _train_tokenizer(vocab_size, extra_texts)
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
            "d_model": 64,
            "encoder_layers": encoder_layers,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "num_mel_bins": 128,
            "max_source_positions": MEL_FRAMES_PER_SECOND * chunk_length // 2,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
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
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def ensure_tiny_model(out_dir: str | Path, **kwargs) -> Path:
    """Return ``out_dir``, building the tiny model there first if it holds none."""
    return build_tiny_qwen2_audio(out_dir, overwrite=False, **kwargs)
