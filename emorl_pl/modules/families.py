"""One adapter per audio-LM family: where its audio tower, projector and language model sit, how it encodes
audio, which special tokens carry audio, and what per-call state a rollout must clear.

The policy picks the adapter from ``config.model_type`` (``family_for``); a new family is one new subclass
of ``AudioLMFamily`` added to ``FAMILIES``.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor, nn


class AudioLMFamily:
    """What the policy needs to know about one Hugging Face audio-LM family; the parts all share live here."""

    model_type: str  # config.model_type
    model_class: str  # dotted import path of the class ``from_pretrained`` loads
    audio_token_names: tuple[str, ...]  # special tokens that carry audio: never sampled (the tokenizer's subset)

    def audio_tower(self, hf_model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def projector(self, hf_model: nn.Module) -> nn.Module | None:
        """Maps audio tower outputs to the text width; None where the tower projects itself."""
        return None

    def audio_token_id(self, hf_model: nn.Module) -> int:
        """The id of the placeholder token whose positions receive the audio features."""
        return int(hf_model.config.audio_token_index)

    def encode_audio(self, hf_model: nn.Module, features: Tensor, feature_mask: Tensor) -> list[Tensor]:
        """Audio tower output per utterance, [(n_audio_tokens_b, D)], as the model's forward computes it."""
        raise NotImplementedError

    def reset_state(self, hf_model: nn.Module) -> None:
        """Clear state that a previous call left on the model and that would corrupt the next rollout."""

    @staticmethod
    def decoder(hf_model: nn.Module) -> nn.Module:
        return hf_model.get_decoder()

    @staticmethod
    def embed(hf_model: nn.Module) -> nn.Module:
        return hf_model.get_input_embeddings()

    def merge(self, hf_model: nn.Module, input_ids: Tensor, audio_hidden: list[Tensor]) -> Tensor:
        """Token embeddings with the (projected) audio scattered into the audio token positions, (B, P, D)."""
        embeds = self.embed(hf_model)(input_ids)
        audio = torch.cat(audio_hidden).to(embeds.device)
        projector = self.projector(hf_model)
        if projector is not None:
            audio = projector(audio)
        is_audio = (input_ids == self.audio_token_id(hf_model)).unsqueeze(-1)
        n_slots = int(is_audio.sum())
        if n_slots != audio.shape[0]:
            raise ValueError(f"prompt has {n_slots} audio token slots but {audio.shape[0]} audio features")
        return embeds.masked_scatter(is_audio, audio.to(embeds.dtype))

    def direct_call_modules(self, hf_model: nn.Module) -> dict[str, nn.Module]:
        """The submodules the policy calls directly, bypassing the model's root forward."""
        modules = {
            "audio_tower": self.audio_tower(hf_model),
            "embed_tokens": self.embed(hf_model),
            "decoder": self.decoder(hf_model),
            "lm_head": hf_model.lm_head,
        }
        projector = self.projector(hf_model)
        if projector is not None:
            modules["projector"] = projector
        return modules


class Qwen2Audio(AudioLMFamily):
    """Qwen2-Audio: ``model.audio_tower`` (Whisper-like), ``model.multi_modal_projector``, ``model.language_model``."""

    model_type = "qwen2_audio"
    model_class = "transformers.Qwen2AudioForConditionalGeneration"
    audio_token_names = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")

    def audio_tower(self, hf_model: nn.Module) -> nn.Module:
        return hf_model.model.audio_tower

    def projector(self, hf_model: nn.Module) -> nn.Module:
        return hf_model.model.multi_modal_projector

    def encode_audio(self, hf_model: nn.Module, features: Tensor, feature_mask: Tensor) -> list[Tensor]:
        # transformers 5.17 inlines this in Qwen2AudioModel.forward; the same steps here, but for the mask.
        from transformers.masking_utils import create_bidirectional_mask

        tower = self.audio_tower(hf_model)
        feat_lens, out_lens = tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
        batch, _, mel_frames = features.shape
        max_len = (mel_frames - 2) // 2 + 1
        valid = torch.arange(max_len, device=feat_lens.device)[None, :] < feat_lens[:, None]
        dtype = self.embed(hf_model).weight.dtype
        if tower.config._attn_implementation in ("sdpa", "eager"):
            # The expanded (B, 1, S, S) mask only says which keys are padding. As (B, 1, 1, S), additive, it says
            # the same and is read S times less (SDPA converted the boolean one in every layer: 1/6 of the
            # tower's time on CPU); the valid positions' outputs are identical.
            mask = torch.zeros(batch, 1, 1, max_len, dtype=dtype, device=features.device)
            mask.masked_fill_(~valid[:, None, None, :].to(features.device), torch.finfo(dtype).min)
        else:  # e.g. flash attention takes its own (B, S) form
            dummy = torch.zeros(batch, max_len, 1, dtype=dtype, device=features.device)
            mask = create_bidirectional_mask(config=tower.config, inputs_embeds=dummy, attention_mask=valid.long())
        hidden = tower(features, attention_mask=mask).last_hidden_state
        return [hidden[b, : int(n)] for b, n in enumerate(out_lens)]


class Qwen2_5OmniThinker(AudioLMFamily):
    """The Qwen2.5-Omni thinker: ``audio_tower`` projects to the text width itself, text model in ``model``."""

    model_type = "qwen2_5_omni_thinker"
    model_class = "transformers.Qwen2_5OmniThinkerForConditionalGeneration"
    # Omni releases spell their audio tokens either way; the tokenizer's vocabulary decides which exist.
    audio_token_names = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|audio_start|>", "<|audio_end|>",
                         "<|audio_pad|>")

    def audio_tower(self, hf_model: nn.Module) -> nn.Module:
        return hf_model.audio_tower

    def encode_audio(self, hf_model: nn.Module, features: Tensor, feature_mask: Tensor) -> list[Tensor]:
        # get_audio_features returns all utterances flat, (sum n_b, D_text), projection included
        flat = hf_model.get_audio_features(features, feature_mask, return_dict=True).last_hidden_state
        _, out_lens = self.audio_tower(hf_model)._get_feat_extract_output_lengths(feature_mask.sum(-1))
        return list(flat.split(out_lens.tolist()))

    def reset_state(self, hf_model: nn.Module) -> None:
        hf_model.rope_deltas = None  # (rows, 1) rotary deltas cached by the previous call, for other rows


FAMILIES: dict[str, AudioLMFamily] = {family.model_type: family for family in (Qwen2Audio(), Qwen2_5OmniThinker())}


def family_for(model_type: str, where: str = "config.json") -> AudioLMFamily:
    """The adapter of ``model_type``; an unknown type is an error naming the known ones (no guessing)."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not one of {sorted(FAMILIES)}; add an AudioLMFamily for it "
            "in emorl_pl/modules/families.py (model_class alone cannot say where its audio tower sits)"
        )
    return FAMILIES[model_type]


def import_class(path: str) -> type:
    """The class at a dotted import path such as ``transformers.Qwen2AudioForConditionalGeneration``."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"model_class must be a dotted import path like 'transformers.X', got {path!r}")
    return getattr(importlib.import_module(module), name)
