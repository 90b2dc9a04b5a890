"""One adapter per audio-LM family: where its audio tower, projector and language model sit, how it encodes
audio, which special tokens carry audio, its rotary positions, its processor, its published checkpoint layout
and what per-call state a rollout must clear.

The policy picks the adapter from ``config.model_type`` (``family_for``); a new family is one new subclass
of ``AudioLMFamily`` added to ``FAMILIES``.

The Omni thinkers (Qwen2.5-Omni, Qwen3-Omni-30B-A3B) are published inside whole Omni checkpoints: their
``config.json`` is the Omni model's (``thinker_config`` nested in it) and their weights carry a ``thinker.``
prefix. That folder is what vLLM serves the thinker from, so it is the layout these families load from and
save to (``hub_wrapper_class``, ``hub_prefix``); transformers loads the thinker class alone from it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn


class AudioLMFamily:
    """What the policy needs to know about one Hugging Face audio-LM family; the parts all share live here."""

    model_type: str  # config.model_type of the model class below
    model_class: str  # dotted import path of the class ``from_pretrained`` loads
    audio_token_names: tuple[str, ...]  # special tokens that carry audio: never sampled (the tokenizer's subset)
    # The published checkpoint's class when it is not ``model_class`` (a whole Omni model holding the thinker),
    # the prefix of this model's weights in it, and its config.model_type.
    hub_wrapper_class: str | None = None
    hub_prefix: str = ""
    hub_model_type: str | None = None

    @property
    def config_model_types(self) -> tuple[str, ...]:
        """Every ``config.model_type`` whose folder holds this family's model."""
        return (self.model_type,) + ((self.hub_model_type,) if self.hub_model_type else ())

    def model_config(self, config):
        """The config of ``model_class`` inside a folder's config (the thinker's, from a whole Omni config)."""
        return config

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

    def load_processor(self, model_dir: str | Path, **kwargs):
        """The folder's processor (tokenizer, feature extractor, chat template)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_dir, **kwargs)

    def positions(self, hf_model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                  feature_attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The model's rotary positions of a left-padded prompt batch, (R, B, P), and the offset of the positions
        after the prompt from the text positions, (B, 1): token t of the completion of row b sits at
        ``sum(attention_mask[b]) + t + offset[b]``. One row (R = 1) of cumsum(mask) - 1 and no offset for a
        1-D rotary model; the multimodal-rotary families compute theirs with the model's own code."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[None], attention_mask.new_zeros(len(attention_mask), 1)

    def check_positions(self, hf_model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                        feature_attention_mask: Tensor) -> None:
        """Raise unless ``positions`` are the text positions cumsum(mask) - 1 in every row, offset 0: those are
        the positions the shared prefill, decode and scoring code gives the decoder (``sampling``, ``scoring``).

        For audio-only prompts the Omni thinkers' time-aligned multimodal positions are exactly these (one
        position per 40 ms audio token, text continuing after them); an input whose positions are not
        (video, images) must not be scored with them, so it stops here, naming the first row that differs."""
        rows, offset = self.positions(hf_model, input_ids, attention_mask, feature_attention_mask)
        text = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        valid = attention_mask.bool()
        differs = ((rows.to(text.dtype) != text[None]) & valid[None]).any(0).any(-1) | (offset.squeeze(-1) != 0)
        if bool(differs.any()):
            row = int(differs.nonzero()[0, 0])
            raise NotImplementedError(
                f"{type(self).__name__}: row {row}'s rotary positions (the model's own, {type(hf_model).__name__}) are "
                "not the sequential text positions the policy's prefill, decode and scoring use; only prompts whose "
                "multimodal positions are sequential (audio and text) are supported"
            )

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

    def router_settings(self, hf_model: nn.Module) -> RouterSettings | None:
        """A mixture-of-experts language model's load-balancing settings; None for a dense one."""
        return None

    def check_model(self, hf_model: nn.Module, where: str = "config.json") -> None:
        """Refuse settings of the loaded model that the policy's loss cannot honour (none for a dense family).
        ``output_router_logits`` itself is not one: the policy's passes bypass the root forward, so whether the
        load-balancing loss is added is the trainer's ``router_aux_loss_coef`` (TRL's semantics), not that flag."""

    def scoring_kwargs(self, hf_model: nn.Module) -> dict[str, bool]:
        """Keyword arguments of the policy's scoring calls of the decoder; {} for a dense model."""
        return {}

    @contextlib.contextmanager
    def record_router_logits(self, hf_model: nn.Module) -> Iterator[list[list[Tensor]]]:
        """Inside, each call of each of the decoder's routers (in layer order) appends its router logits,
        (tokens, experts), to that router's list. A dense model has no router: an error."""
        raise ValueError(f"{type(self).__name__} ({type(hf_model).__name__}) is a dense model: it has no router "
                         "logits and no load-balancing loss")
        yield []  # unreachable: makes this a generator for contextmanager

    def router_aux_loss(self, hf_model: nn.Module, router_logits: tuple[Tensor, ...],
                        attention_mask: Tensor | None) -> Tensor:
        """transformers' own load-balancing loss (``load_balancing_loss_func``) of the per-layer router logits of
        one decoder pass, for the model's expert count and top-k: what its forward multiplies by
        ``router_aux_loss_coef`` when ``output_router_logits`` is on. ``attention_mask`` may be any float
        weights, one per token (flattened in the logits' row order): a token of weight w counts as w tokens."""
        raise NotImplementedError(f"{type(self).__name__} has no router")


def resolve_router_aux_coef(family: AudioLMFamily, hf_model: nn.Module, coef: float | None,
                            option: str = "model.init_args.router_aux_loss_coef") -> float:
    """The load-balancing loss weight of a run, as TRL 1.16's ``GRPOTrainer.__init__`` resolves
    ``GRPOConfig.router_aux_loss_coef``: None takes the model config's ``router_aux_loss_coef`` (0.0 for a dense
    model, which declares none); a value is used as given, 0.0 turning the loss off; a nonzero value for a dense
    model is an error naming ``option``."""
    router = family.router_settings(hf_model)
    if router is None:
        if coef:
            raise ValueError(f"{option} is {coef} but {type(hf_model).__name__} ({type(family).__name__}) is not a "
                             "mixture-of-experts model: it has no router and no load-balancing loss to weight; "
                             "leave it unset (null) or 0.0")
        return 0.0
    return router.coef if coef is None else float(coef)


class RouterSettings:
    """Load balancing of a mixture-of-experts language model, as its own config sets it: ``enabled`` is the
    config's ``output_router_logits`` (what the model's own forward would do; the trainer follows
    ``router_aux_loss_coef`` instead, as TRL), ``coef`` the loss weight, and the router's shape."""

    def __init__(self, enabled: bool, coef: float, num_experts: int, top_k: int) -> None:
        self.enabled, self.coef, self.num_experts, self.top_k = enabled, coef, num_experts, top_k

    def __repr__(self) -> str:
        return (f"RouterSettings(enabled={self.enabled}, coef={self.coef}, num_experts={self.num_experts}, "
                f"top_k={self.top_k})")


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


# The processor attributes the Omni processors read from their tokenizer (transformers 5.17's __init__).
_OMNI_TOKEN_ATTRIBUTES = ("image_token", "audio_token", "video_token", "vision_bos_token", "vision_eos_token",
                          "audio_bos_token", "audio_eos_token")


class _NoVision:
    """Stands in for the image and video processors of an Omni processor built without torchvision (which
    transformers' image and video processors need here): the processor's text expansion reads their
    ``merge_size`` even for audio; an image or video input is refused."""

    def __init__(self, merge_size: int) -> None:
        self.merge_size = merge_size

    def __call__(self, *args, **kwargs):
        raise RuntimeError("image and video input need torchvision (pip install torchvision); this processor takes "
                           "audio and text")


# The processor files of an Omni release besides the tokenizer's: an audio-only processor saves them as it
# found them (they hold the image and video settings it does not use).
_OMNI_PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                         "chat_template.json", "chat_template.jinja")


def _audio_only_processor_class(processor_cls: type) -> type:
    """``processor_cls`` (an Omni processor) for audio and text only: the class's own ``__call__`` and chat
    template on the tokenizer and feature extractor, its image and video processors stood in for
    (``_NoVision``). Named like the class, and a subclass of it, so ``isinstance`` checks accept it; its
    ``save_pretrained`` writes the source folder's processor files back (with the tokenizer as it is now), so a
    folder it saves loads as the release does."""
    import shutil

    from transformers.processing_utils import ProcessorMixin

    def __init__(self, feature_extractor=None, tokenizer=None, chat_template=None, merge_size: int = 2,
                 source_dir: str | Path | None = None):
        ProcessorMixin.__init__(self, feature_extractor, tokenizer, chat_template=chat_template)
        self.image_processor = self.video_processor = _NoVision(merge_size)
        self.source_dir = source_dir
        for name in _OMNI_TOKEN_ATTRIBUTES:  # as processor_cls.__init__ sets them
            setattr(self, name, getattr(tokenizer, name))

    def save_pretrained(self, save_directory, **kwargs):
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        for name in _OMNI_PROCESSOR_FILES:
            source = Path(self.source_dir) / name
            if source.is_file() and source.resolve() != (out / name).resolve():
                shutil.copyfile(source, out / name)
        return self.tokenizer.save_pretrained(out, **kwargs)

    name = processor_cls.__name__
    if isinstance(globals().get(name), type) and issubclass(globals()[name], processor_cls):
        return globals()[name]  # one class per processor, importable here by name (pickle finds it)
    cls = type(name, (processor_cls,), {"__init__": __init__, "save_pretrained": save_pretrained,
                                        "__module__": __name__, "__doc__": _audio_only_processor_class.__doc__})
    globals()[name] = cls
    return cls


class _OmniThinker(AudioLMFamily):
    """What the Omni thinkers share: ``audio_tower`` projects to the text width itself, the text model is
    ``model``, multimodal rotary positions (``get_rope_index``), cached ``rope_deltas``, the whole-Omni
    checkpoint layout and the Omni processor."""

    hub_prefix = "thinker."
    processor_class: str  # dotted path of the Omni processor

    def model_config(self, config):
        return config.thinker_config if config.model_type == self.hub_model_type else config

    def audio_tower(self, hf_model: nn.Module) -> nn.Module:
        return hf_model.audio_tower

    def reset_state(self, hf_model: nn.Module) -> None:
        hf_model.rope_deltas = None  # (rows, 1) rotary deltas cached by the previous call, for other rows

    def positions(self, hf_model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                  feature_attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        # The thinker's forward computes them this way for audio and text (no image/video grids).
        positions, deltas = hf_model.get_rope_index(input_ids, attention_mask=attention_mask,
                                                    audio_seqlens=feature_attention_mask.sum(-1))
        return positions, deltas

    def load_processor(self, model_dir: str | Path, **kwargs):
        """The folder's Omni processor; without torchvision (which its image and video processors need) the same
        class for audio and text (``_audio_only_processor_class``), from the same files."""
        from transformers.processing_utils import ProcessorMixin
        from transformers.utils import is_torchvision_available

        settings = ProcessorMixin.get_processor_dict(model_dir)[0]
        omni = import_class(self.processor_class)
        # a folder whose processor is another class (a thinker saved with a Qwen2-Audio processor) gets that one
        if is_torchvision_available() or settings.get("processor_class", omni.__name__) != omni.__name__:
            return super().load_processor(model_dir, **kwargs)
        from transformers import AutoFeatureExtractor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return _audio_only_processor_class(omni)(
            feature_extractor=AutoFeatureExtractor.from_pretrained(model_dir), tokenizer=tokenizer,
            chat_template=settings.get("chat_template") or tokenizer.chat_template,
            merge_size=int(settings.get("merge_size", settings.get("image_processor", {}).get("merge_size", 2))),
            source_dir=model_dir,
        )


class Qwen2_5OmniThinker(_OmniThinker):
    """The Qwen2.5-Omni thinker: Whisper-like audio tower with its own projection, Qwen2 text layers with
    3-section multimodal RoPE (mrope_section [16, 24, 24])."""

    model_type = "qwen2_5_omni_thinker"
    model_class = "transformers.Qwen2_5OmniThinkerForConditionalGeneration"
    hub_wrapper_class = "transformers.Qwen2_5OmniForConditionalGeneration"
    hub_model_type = "qwen2_5_omni"
    processor_class = "transformers.Qwen2_5OmniProcessor"
    # Omni releases spell their audio tokens either way; the tokenizer's vocabulary decides which exist.
    audio_token_names = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|audio_start|>", "<|audio_end|>",
                         "<|audio_pad|>")

    def encode_audio(self, hf_model: nn.Module, features: Tensor, feature_mask: Tensor) -> list[Tensor]:
        # get_audio_features returns all utterances flat, (sum n_b, D_text), projection included
        flat = hf_model.get_audio_features(features, feature_mask, return_dict=True).last_hidden_state
        _, out_lens = self.audio_tower(hf_model)._get_feat_extract_output_lengths(feature_mask.sum(-1))
        return list(flat.split(out_lens.tolist()))


class Qwen3OmniMoeThinker(_OmniThinker):
    """The Qwen3-Omni-30B-A3B (MoE) thinker: an audio tower of 2-D convolutions over 100-frame chunks that
    projects itself, Qwen3-MoE text layers (128 experts, 8 per token, a linear router) with interleaved
    multimodal RoPE; audio tokens ``<|audio_start|><|audio_pad|>...<|audio_end|>``."""

    model_type = "qwen3_omni_moe_thinker"
    model_class = "transformers.Qwen3OmniMoeThinkerForConditionalGeneration"
    hub_wrapper_class = "transformers.Qwen3OmniMoeForConditionalGeneration"
    hub_model_type = "qwen3_omni_moe"
    processor_class = "transformers.Qwen3OmniMoeProcessor"
    audio_token_names = ("<|audio_start|>", "<|audio_end|>", "<|audio_pad|>")

    def audio_token_id(self, hf_model: nn.Module) -> int:
        return int(hf_model.config.audio_token_id)

    def encode_audio(self, hf_model: nn.Module, features: Tensor, feature_mask: Tensor) -> list[Tensor]:
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
            _get_feat_extract_output_lengths,
        )

        flat = hf_model.get_audio_features(features, feature_mask, return_dict=True).last_hidden_state
        out_lens = _get_feat_extract_output_lengths(feature_mask.sum(-1), self.audio_tower(hf_model).n_window)
        return list(flat.split(out_lens.tolist()))

    def router_aux_loss(self, hf_model: nn.Module, router_logits: tuple[Tensor, ...],
                        attention_mask: Tensor | None) -> Tensor:
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import load_balancing_loss_func

        router = self.router_settings(hf_model)
        return load_balancing_loss_func(router_logits, router.num_experts, router.top_k, attention_mask)

    def router_settings(self, hf_model: nn.Module) -> RouterSettings:
        text = hf_model.config.text_config
        return RouterSettings(bool(text.output_router_logits), float(text.router_aux_loss_coef), int(text.num_experts),
                              int(text.num_experts_per_tok))

    def scoring_kwargs(self, hf_model: nn.Module) -> dict[str, bool]:
        # Router logits are recorded by ``record_router_logits``, never by the model's own output capture, which
        # a config's output_router_logits: true would run in every call, and which records nothing on an FSDP2
        # unit: transformers 5.17 looks up what a model can record by str(its class), which fully_shard changes.
        return {"output_router_logits": False}

    @contextlib.contextmanager
    def record_router_logits(self, hf_model: nn.Module) -> Iterator[list[list[Tensor]]]:
        # The routers' own output, index 0: what the model's capture (its _can_record_outputs) takes.
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
            Qwen3OmniMoeThinkerTextTopKRouter,
        )

        routers = [m for m in self.decoder(hf_model).modules() if isinstance(m, Qwen3OmniMoeThinkerTextTopKRouter)]
        recorded: list[list[Tensor]] = [[] for _ in routers]
        handles = [router.register_forward_hook(lambda module, args, out, logs=logs: logs.append(out[0]))
                   for router, logs in zip(routers, recorded)]
        try:
            yield recorded
        finally:  # before any backward: a checkpointed layer's replay must not record again
            for handle in handles:
                handle.remove()

    def check_model(self, hf_model: nn.Module, where: str = "config.json") -> None:
        """The router settings the load-balancing loss reads must be there and make sense."""
        text = hf_model.config.text_config
        missing = [k for k in ("output_router_logits", "router_aux_loss_coef", "num_experts", "num_experts_per_tok")
                   if getattr(text, k, None) is None]
        if missing:
            raise ValueError(f"{where}: thinker_config.text_config has no {', '.join(missing)} (a mixture-of-experts "
                             "text config declares them; the load-balancing loss needs them)")
        router = self.router_settings(hf_model)
        if not 0 < router.top_k <= router.num_experts or not math.isfinite(router.coef):
            raise ValueError(f"{where}: thinker_config.text_config must have 0 < num_experts_per_tok <= num_experts "
                             f"and a finite router_aux_loss_coef, got {router}")


@functools.cache
def _af3_processor_class() -> type:
    """``AudioFlamingo3Processor`` as the policy's prompts call it (``prompting.build_prompts``): its own
    ``__call__`` with two differences. A call's ``padding`` pads the text only: the processor passes a
    top-level ``padding`` to the feature extractor too, which then pads the windows to the longest clip instead
    of the encoder's fixed 3000 frames (the encoder adds all 1500 positions). And the mask of the mel frames is
    returned as ``feature_attention_mask``, Qwen2-Audio's name, which the prompts read (AF3's forward calls it
    ``input_features_mask``). Named like the class and a subclass of it: it saves as the release does."""
    from transformers import AudioFlamingo3Processor

    def __call__(self, text=None, audio=None, output_labels=False, **kwargs):
        if "padding" in kwargs:
            kwargs["text_kwargs"] = {**kwargs.get("text_kwargs", {}), "padding": kwargs.pop("padding")}
        out = AudioFlamingo3Processor.__call__(self, text, audio, output_labels, **kwargs)
        if "input_features_mask" in out:
            out["feature_attention_mask"] = out.pop("input_features_mask")
        return out

    return type("AudioFlamingo3Processor", (AudioFlamingo3Processor,), {
        "__call__": __call__, "__module__": __name__, "__doc__": _af3_processor_class.__doc__})


class AudioFlamingo3(AudioLMFamily):
    """Audio Flamingo 3 (``nvidia/audio-flamingo-3-hf``): ``model.audio_tower`` (Whisper-large-v3-like encoder,
    average-pooled by 2 and layer-normed: 750 tokens per 30 s window), ``model.multi_modal_projector`` (2-layer
    MLP), ``model.language_model`` (Qwen2, plain 1-D rotary positions: ``position_ids`` as ``generate`` makes
    them); one ``<sound>`` per audio, which the processor expands."""

    model_type = "audioflamingo3"
    model_class = "transformers.AudioFlamingo3ForConditionalGeneration"
    # <sound> carries the audio; the tokenizer's other media tokens (speech, sound boundaries) are never text.
    audio_token_names = ("<sound>", "<speech>", "<|sound_bos|>", "<|sound_eos|>")

    def audio_tower(self, hf_model: nn.Module) -> nn.Module:
        return hf_model.model.audio_tower

    def projector(self, hf_model: nn.Module) -> nn.Module:
        return hf_model.model.multi_modal_projector

    def audio_token_id(self, hf_model: nn.Module) -> int:
        return int(hf_model.config.audio_token_id)

    def encode_audio(self, hf_model: nn.Module, features: Tensor, feature_mask: Tensor) -> list[Tensor]:
        # AudioFlamingo3Model.get_audio_features less the projector (``merge`` applies it): the tower's forward,
        # then each window's valid outputs. One window per utterance: the prompts crop audio to the window.
        tower = self.audio_tower(hf_model)
        hidden = tower(features, input_features_mask=feature_mask).last_hidden_state
        _, out_lens = tower._get_feat_extract_output_lengths(feature_mask.sum(-1).to(torch.long))
        return [hidden[b, : int(n)] for b, n in enumerate(out_lens)]

    def load_processor(self, model_dir: str | Path, **kwargs):
        """The folder's ``AudioFlamingo3Processor``, as the prompts call it (``_af3_processor_class``)."""
        return _af3_processor_class().from_pretrained(model_dir, **kwargs)


FAMILIES: dict[str, AudioLMFamily] = {
    model_type: family
    for family in (Qwen2Audio(), Qwen2_5OmniThinker(), Qwen3OmniMoeThinker(), AudioFlamingo3())
    for model_type in family.config_model_types
}


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
