"""The audio-language-model policy: load, LoRA, reference, prompts, rollout and completion log-probs.

The audio is encoded once per utterance: ``encode_prompts`` runs the audio tower and caches its output;
rollout and every later log-prob pass re-embed the text tokens and scatter the cached audio features into
the ``<|AUDIO|>`` positions, then run only the language model on ``inputs_embeds``. Works for
Qwen2-Audio (``qwen2_audio``) and the Qwen2.5-Omni thinker (``qwen2_5_omni_thinker``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from emorl_pl.grpo import completion_mask, is_truncated, token_logprobs
from emorl_pl.modules.fused_decode import FusedDecodeStep
from emorl_pl.modules.fused_decode import unsupported as unsupported_for_fusion
from emorl_pl.modules.sharding import full_state_dict_cpu, gathered, is_sharded, shard_model

AUDIO_SPECIAL_TOKENS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
# Omni spells its audio tokens differently; suppress whichever of these the tokenizer knows.
_AUDIO_TOKEN_CANDIDATES = AUDIO_SPECIAL_TOKENS + ("<|audio_start|>", "<|audio_end|>", "<|audio_pad|>")
MODEL_CLASSES = {
    "qwen2_audio": "transformers.Qwen2AudioForConditionalGeneration",
    "qwen2_5_omni_thinker": "transformers.Qwen2_5OmniThinkerForConditionalGeneration",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger(__name__)
FUSED_DECODE_MODES = ("adapters", "merged", "off")
LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """LoRA on the language model only.

    ``target_modules``: None -> the language model's q/k/v/o/gate/up/down projections; a list of short
    names -> those projections, still scoped to the language model (the audio tower also has q_proj...);
    a string -> a raw peft regex over full module names (no scoping).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = None


@dataclass
class Prompts:
    """Processor outputs for B utterances; text left-padded for generation."""

    input_ids: Tensor  # (B, P)
    attention_mask: Tensor  # (B, P)
    input_features: Tensor  # (B, n_mels, frames)
    feature_attention_mask: Tensor  # (B, frames)
    # Per utterance: seconds of audio past the encoder window, cropped before the model saw it (0.0 if none).
    seconds_ignored: tuple[float, ...] = ()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Prompts:
        return Prompts(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.input_features,
                                                  self.feature_attention_mask)), seconds_ignored=self.seconds_ignored)


@dataclass
class PromptEmbeds:
    """Prompt embeddings with the audio merged, plus the cached audio-tower output to re-merge later.

    ``audio_hidden[b]``: audio tower output of utterance b, (n_audio_tokens_b, D_audio), detached.
    ``ref_audio_hidden``: the same from the reference copy (full fine-tuning with a trainable tower only).
    """

    input_ids: Tensor  # (B, P)
    attention_mask: Tensor  # (B, P)
    inputs_embeds: Tensor  # (B, P, D)
    audio_hidden: list[Tensor]
    prompts: Prompts
    ref_audio_hidden: list[Tensor] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class Rollout:
    """G completions per prompt; row b*G + g is sample g of utterance b."""

    prompt: PromptEmbeds  # B rows, not repeated
    completion_ids: Tensor  # (B*G, T) right-padded with pad id after EOS
    completion_mask: Tensor  # (B*G, T) 1 up to and including the first EOS
    truncated: Tensor  # (B*G,) bool: no EOS within max_new_tokens
    texts: list[str]  # decoded, special tokens stripped
    group_size: int

    def __len__(self) -> int:
        return self.completion_ids.shape[0]


def _import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"model_class must be a dotted import path like 'transformers.X', got {path!r}")
    return getattr(importlib.import_module(module), name)


def _as_row_index(rows: slice | Tensor | Sequence[int] | None, n: int, device: torch.device) -> Tensor:
    if rows is None:
        return torch.arange(n, device=device)
    if isinstance(rows, slice):
        return torch.arange(n, device=device)[rows]
    idx = torch.as_tensor(rows, device=device)
    if idx.dtype == torch.bool:
        idx = idx.nonzero().squeeze(1)
    if idx.dim() != 1 or (idx.numel() and (idx.min() < 0 or idx.max() >= n)):
        raise IndexError(f"rows must select among {n} rollout rows, got {rows!r}")
    return idx.long()


class AudioLMPolicy(nn.Module):
    """A local Hugging Face audio-LM + processor as a GRPO policy (see the module docstring).

    Call ``load()`` (the Lightning module does it in ``configure_model``); other methods load lazily.
    Reference policy: with LoRA, the adapters disabled; with full fine-tuning, a frozen deep copy that is
    neither a registered submodule (not in ``state_dict``/``parameters``) nor trained.

    ``fused_decode``: how rollouts run the language model per token (``fused_decode.py``). "adapters"
    (default): a fused step on the module's own weights, LoRA applied as peft does, no copies; "merged":
    LoRA merged and q|k|v, gate|up concatenated once per rollout (fastest; a copy of the LM's projection
    weights while sampling); "off": the decoder's own forward. Architectures the fused step does not
    cover, and sharded models, always use the decoder's forward.
    """

    def __init__(
        self,
        model_dir: str,
        model_class: str | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = "sdpa",
        gradient_checkpointing: bool = False,
        lora: LoraSettings | None = None,
        freeze_audio_tower: bool = True,
        system_prompt: str | None = None,
        build_tiny_if_missing: bool = False,
        fused_decode: Literal["adapters", "merged", "off"] = "adapters",
    ) -> None:
        super().__init__()
        if not build_tiny_if_missing and not Path(model_dir).is_dir():
            # Fail at config time, before anything is loaded.
            raise FileNotFoundError(
                f"model.init_args.policy.init_args.model_dir={model_dir!r} does not exist (a local Hugging Face "
                "model folder is expected; set build_tiny_if_missing: true to build the tiny test model there)"
            )
        self.build_tiny_if_missing = build_tiny_if_missing
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if fused_decode not in FUSED_DECODE_MODES:
            raise ValueError(f"fused_decode must be one of {list(FUSED_DECODE_MODES)}, got {fused_decode!r}")
        self.model_dir = model_dir
        self.model_class = model_class
        self.dtype_name = dtype
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self.lora = lora
        self.freeze_audio_tower = freeze_audio_tower
        self.system_prompt = system_prompt
        self.fused_decode = fused_decode
        self.model: nn.Module | None = None
        self.processor = None
        self.audio_encoder_calls = 0
        self.audio_utterances_encoded = 0

    # ------------------------------------------------------------------------------------------ loading
    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self, reference: bool = True) -> AudioLMPolicy:
        """Load processor and model from ``model_dir``, apply freezing, LoRA, checkpointing. Idempotent.

        ``reference=False`` (full fine-tuning about to be sharded): no frozen reference copy yet; ``shard``
        builds a sharded one, so that no rank ever holds two full copies of the model in host memory.
        """
        if self.loaded:
            return self
        from transformers import AutoConfig, AutoProcessor

        path = Path(self.model_dir)
        if self.build_tiny_if_missing and not (path / "config.json").is_file():
            from emorl_pl.modules.tiny import ensure_tiny_model

            ensure_tiny_model(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model_dir {str(path)!r} does not exist or is not a directory")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model_dir {str(path)!r} has no config.json (not a saved HF model)")
        config = AutoConfig.from_pretrained(path)
        class_path = self.model_class or MODEL_CLASSES.get(config.model_type)
        if class_path is None:
            raise ValueError(
                f"{path / 'config.json'}: model_type {config.model_type!r} is not one of {sorted(MODEL_CLASSES)}; "
                "pass model_class as a dotted import path"
            )
        kwargs = {"dtype": DTYPES[self.dtype_name]}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        hf_model = _import_class(class_path).from_pretrained(path, **kwargs)
        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"  # generation appends on the right

        # The unwrapped model as a plain (unregistered) attribute: peft injects LoRA into it in place.
        object.__setattr__(self, "_hf", hf_model)
        if self.freeze_audio_tower:
            self._audio_tower(hf_model).requires_grad_(False)
        object.__setattr__(self, "_reference_model", None)
        object.__setattr__(self, "_mesh", None)
        if self.lora is None and reference:
            ref = copy.deepcopy(hf_model).eval().requires_grad_(False)
            object.__setattr__(self, "_reference_model", ref)  # not registered: out of state_dict/optimizer

        if self.gradient_checkpointing:
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.lora is not None:
            from peft import LoraConfig, get_peft_model

            if self.gradient_checkpointing:
                hf_model.enable_input_require_grads()  # peft + checkpointing: the embedding output needs grad
            lora_config = LoraConfig(
                r=self.lora.r,
                lora_alpha=self.lora.alpha,
                lora_dropout=self.lora.dropout,
                target_modules=self._lora_targets(hf_model),
                bias="none",
            )
            self.model = get_peft_model(hf_model, lora_config)
        else:
            self.model = hf_model
        self._audio_tower(hf_model).register_forward_hook(self._count_audio_call, with_kwargs=True)
        self._token_ids()
        return self

    def _lora_targets(self, hf_model: nn.Module) -> str:
        """A regex over full module names that matches only projections inside the language model."""
        if isinstance(self.lora.target_modules, str):
            return self.lora.target_modules
        names = tuple(self.lora.target_modules or LM_PROJECTIONS)
        decoder = self._decoder(hf_model)
        prefix = next(name for name, module in hf_model.named_modules() if module is decoder)
        return rf"^{re.escape(prefix)}\.layers\.\d+\..*\.({'|'.join(map(re.escape, names))})$"

    def _token_ids(self) -> None:
        tok = self.processor.tokenizer
        vocab = tok.get_vocab()
        self.audio_token_ids = sorted({vocab[t] for t in _AUDIO_TOKEN_CANDIDATES if t in vocab})
        eos = [vocab[t] for t in ("<|im_end|>",) if t in vocab]
        if tok.eos_token_id is not None:
            eos.append(tok.eos_token_id)
        self.eos_token_ids = list(dict.fromkeys(eos))
        if not self.eos_token_ids:
            raise ValueError(f"{self.model_dir}: tokenizer has neither <|im_end|> nor an eos_token")
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_ids[0]

    # ------------------------------------------------------------------------------ model-specific parts
    @staticmethod
    def _audio_tower(hf_model: nn.Module) -> nn.Module:
        inner = getattr(hf_model, "model", None)
        tower = getattr(hf_model, "audio_tower", None) or getattr(inner, "audio_tower", None)
        if tower is None:
            raise TypeError(f"{type(hf_model).__name__} has no audio_tower")
        return tower

    @staticmethod
    def _decoder(hf_model: nn.Module) -> nn.Module:
        return hf_model.get_decoder()

    @staticmethod
    def _projector(hf_model: nn.Module) -> nn.Module:
        """Maps tower outputs to the text width (Qwen2-Audio); identity where the tower projects itself (Omni)."""
        inner = getattr(hf_model, "model", None)
        return getattr(inner, "multi_modal_projector", None) or nn.Identity()

    def _audio_token_id(self, hf_model: nn.Module) -> int:
        config = hf_model.config
        return int(getattr(config, "audio_token_id", None) or config.audio_token_index)

    def _count_audio_call(self, module, args, kwargs, output) -> None:
        self.audio_encoder_calls += 1
        lens = kwargs.get("feature_lens")
        features = args[0] if args else kwargs.get("input_features")
        self.audio_utterances_encoded += len(lens) if lens is not None else features.shape[0]

    def _encode_audio(self, hf_model: nn.Module, features: Tensor, feature_mask: Tensor) -> list[Tensor]:
        """Audio tower output per utterance, [(n_audio_tokens_b, D_audio)], as the model's forward computes it."""
        if hasattr(hf_model, "get_audio_features"):  # Omni thinker: flat (sum n_b, D_text), projection inside
            flat = hf_model.get_audio_features(features, feature_mask, return_dict=True).last_hidden_state
            _, out_lens = self._audio_tower(hf_model)._get_feat_extract_output_lengths(feature_mask.sum(-1))
            return list(flat.split(out_lens.tolist()))
        # Qwen2-Audio: transformers 5.17 inlines this in Qwen2AudioModel.forward; the same steps here.
        from transformers.masking_utils import create_bidirectional_mask

        tower = self._audio_tower(hf_model)
        feat_lens, out_lens = tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
        batch, _, mel_frames = features.shape
        max_len = (mel_frames - 2) // 2 + 1
        valid = torch.arange(max_len, device=feat_lens.device)[None, :] < feat_lens[:, None]
        dummy = torch.zeros(batch, max_len, 1, dtype=self._embed(hf_model).weight.dtype, device=features.device)
        mask = create_bidirectional_mask(config=tower.config, inputs_embeds=dummy, attention_mask=valid.long())
        hidden = tower(features, attention_mask=mask).last_hidden_state
        return [hidden[b, : int(n)] for b, n in enumerate(out_lens)]

    @staticmethod
    def _embed(hf_model: nn.Module) -> nn.Module:
        return hf_model.get_input_embeddings()

    def _merge(self, hf_model: nn.Module, input_ids: Tensor, audio_hidden: list[Tensor]) -> Tensor:
        """Token embeddings with the projected audio scattered into the ``<|AUDIO|>`` positions, (B, P, D)."""
        embeds = self._embed(hf_model)(input_ids)
        audio = self._projector(hf_model)(torch.cat(audio_hidden).to(embeds.device))
        is_audio = (input_ids == self._audio_token_id(hf_model)).unsqueeze(-1)
        n_slots = int(is_audio.sum())
        if n_slots != audio.shape[0]:
            raise ValueError(f"prompt has {n_slots} audio token slots but {audio.shape[0]} audio features")
        return embeds.masked_scatter(is_audio, audio.to(embeds.dtype))

    # ------------------------------------------------------------------------------------ reference etc.
    @property
    def hf_model(self) -> nn.Module:
        """The underlying transformers model (LoRA layers injected in place when LoRA is on)."""
        self.load()
        return self._hf

    def trainable_parameters(self) -> list[nn.Parameter]:
        self.load()
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """Inside, forward passes use the reference policy: adapters off (LoRA) or the frozen copy."""
        self.load()
        if self.lora is not None:
            with self.model.disable_adapter():
                yield self._hf
            return
        ref = self._reference_model
        param, ref_param = next(self._hf.parameters()), next(ref.parameters())
        # A sharded reference already sits on the mesh's devices, in the compute dtype on purpose.
        if not self.is_sharded and (ref_param.device, ref_param.dtype) != (param.device, param.dtype):
            ref.to(device=param.device, dtype=param.dtype)  # unregistered, so .to() on the policy skips it
        yield ref

    def reset_reference(self, save_dir: str | Path | None = None) -> None:
        """Full fine-tuning: make the reference a frozen copy of the current weights (e.g. the cold-start
        model when RL begins), optionally saved with ``save_pretrained`` to ``save_dir`` so that a resumed
        run restores it with ``load_reference``. With LoRA the reference is always the base model.

        Sharded (FSDP2): each rank copies its own shards into the sharded reference (no gather); saving
        gathers the full weights, which every rank must call (rank 0 writes; others pass ``save_dir=None``
        and ``gather=True``)."""
        self.load()
        if self.lora is not None:
            raise ValueError("with LoRA the reference is the base model (adapters off); it cannot be reset")
        if self.is_sharded:
            ref = self._reference_model
            with torch.no_grad():
                for (name, p), (ref_name, r) in zip(self._hf.named_parameters(), ref.named_parameters(), strict=True):
                    if name != ref_name:
                        raise RuntimeError(f"policy and reference parameters differ: {name} vs {ref_name}")
                    r.to_local().copy_(p.to_local())
            state = full_state_dict_cpu(ref)  # a collective: every rank gathers, rank 0 keeps it all
            if save_dir is not None:
                ref.save_pretrained(save_dir, state_dict=state)
                self.processor.save_pretrained(save_dir)
            return
        ref = copy.deepcopy(self._hf).eval().requires_grad_(False)
        for module in ref.modules():
            module._forward_hooks.clear()  # the copy must not count as the policy's audio-encoder calls
        object.__setattr__(self, "_reference_model", ref)
        if save_dir is not None:
            ref.save_pretrained(save_dir)
            self.processor.save_pretrained(save_dir)

    def load_reference(self, model_dir: str | Path) -> None:
        """Full fine-tuning: load the reference from a model folder (one written by ``reset_reference``),
        sharded like the policy when the policy is."""
        self.load()
        if self.lora is not None:
            raise ValueError("with LoRA the reference is the base model (adapters off)")
        if not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"reference model folder {str(model_dir)!r} has no config.json")
        object.__setattr__(self, "_reference_model", None)
        self._set_reference(self._load_frozen(model_dir))

    def fold_adapters_into_base(self) -> dict[str, Tensor]:
        """LoRA: make the policy as it is now the new base, so that the reference (adapters off) equals it.

        Per LoRA layer, ``W += scaling * B @ A`` (peft's merge, computed on full tensors in float32),
        then ``B = 0``: the policy's function is unchanged (``W' x + 0``) and the adapters restart from
        there. Returns the folded ``{lora_A, lora_B, scaling}`` per layer (full CPU tensors) for the
        checkpoint: a resumed run re-applies them to the freshly loaded base with ``fold_into_base``.
        Works on FSDP2-sharded weights (the delta is distributed like the base weight).
        """
        self.load()
        if self.lora is None:
            raise ValueError("fold_adapters_into_base needs LoRA (full fine-tuning resets the reference instead)")
        folded: dict[str, Tensor] = {}
        for name, layer in self._lora_layers():
            for adapter in layer.active_adapters:
                # clone: .float().cpu() of a CPU float32 parameter is the parameter itself
                for kind, module in (("A", layer.lora_A[adapter]), ("B", layer.lora_B[adapter])):
                    folded[f"{name}|{adapter}|{kind}"] = _full_tensor(module.weight).detach().float().cpu().clone()
                folded[f"{name}|{adapter}|scaling"] = torch.tensor(float(layer.scaling[adapter]))
        self.fold_into_base(folded)
        with torch.no_grad():
            for _, layer in self._lora_layers():
                for adapter in layer.active_adapters:
                    layer.lora_B[adapter].weight.zero_()
        return folded

    def fold_into_base(self, folded: dict[str, Tensor]) -> None:
        """Add ``scaling * B @ A`` of each folded adapter (``fold_adapters_into_base``'s output) to its base
        weight; the adapters themselves are left as they are."""
        self.load()
        layers = dict(self._lora_layers())
        with torch.no_grad():
            for key in [k for k in folded if k.endswith("|A")]:
                name, adapter, _ = key.split("|")
                if name not in layers:
                    raise KeyError(f"folded adapter for {name!r}, which is not a LoRA layer of this model")
                weight = layers[name].get_base_layer().weight
                delta = (folded[f"{name}|{adapter}|B"] @ folded[key]) * folded[f"{name}|{adapter}|scaling"]
                weight.add_(_like(delta, weight))

    def _lora_layers(self) -> list[tuple[str, nn.Module]]:
        from peft.tuners.lora import LoraLayer

        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, LoraLayer)]

    def trainable_parameter_names(self) -> list[str]:
        """Names (relative to this policy, as in its ``state_dict``) of the parameters being trained."""
        return [name for name, p in self.named_parameters() if p.requires_grad]

    @property
    def is_sharded(self) -> bool:
        return self.loaded and is_sharded(self._hf)

    def shard(self, mesh, mp_policy=None) -> None:
        """FSDP2: each transformer block, then every module called outside the root forward, then the root;
        ``mp_policy``: FSDP2's ``MixedPrecisionPolicy`` (compute / reduce dtypes), or None.

        Full fine-tuning: the frozen reference is sharded the same way, in the compute dtype (1/R of it per
        rank), and built from ``model_dir`` after the policy is sharded (one full copy in host RAM at a time).
        """
        self.load(reference=False)
        shard_model(self._hf, mesh, extra_units=list(self.direct_call_modules().values()), mp_policy=mp_policy)
        object.__setattr__(self, "_mesh", mesh)
        object.__setattr__(self, "_compute_dtype", mp_policy.param_dtype if mp_policy is not None else None)
        if self.lora is None:
            object.__setattr__(self, "_reference_model", None)  # drop an unsharded one before the next load
            self._set_reference(self._load_frozen(self.model_dir))

    def _load_frozen(self, model_dir: str | Path) -> nn.Module:
        """A frozen copy of the model in ``model_dir`` (the reference), in the compute dtype when sharded."""
        dtype = self._compute_dtype if self.is_sharded and self._compute_dtype is not None else DTYPES[self.dtype_name]
        kwargs = {"dtype": dtype}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        return type(self._hf).from_pretrained(model_dir, **kwargs).eval().requires_grad_(False)

    def _set_reference(self, ref: nn.Module) -> None:
        """Make ``ref`` the reference (unregistered: out of state_dict and the optimizer), sharded like the
        policy when the policy is."""
        if self._mesh is not None:
            units = [self._audio_tower(ref), self._embed(ref), self._decoder(ref), ref.lm_head]
            projector = self._projector(ref)
            shard_model(ref, self._mesh, extra_units=units + ([] if isinstance(projector, nn.Identity) else [projector]))
        object.__setattr__(self, "_reference_model", ref)

    _compute_dtype: torch.dtype | None = None

    def direct_call_modules(self) -> dict[str, nn.Module]:
        """Submodules that ``completion_logps`` / ``encode_prompts`` call directly, bypassing the root forward.

        Under FSDP2 (``fully_shard``) each must be (inside) its own sharded unit, not only the root's,
        or their parameters are never all-gathered: shard the decoder layers, then these, then the root.
        """
        hf = self.hf_model
        modules = {
            "audio_tower": self._audio_tower(hf),
            "embed_tokens": self._embed(hf),
            "decoder": self._decoder(hf),
            "lm_head": hf.lm_head,
        }
        projector = self._projector(hf)
        if not isinstance(projector, nn.Identity):
            modules["projector"] = projector
        return modules

    def _tower_trainable(self, hf_model: nn.Module) -> bool:
        return any(p.requires_grad for p in self._audio_tower(hf_model).parameters())

    # ------------------------------------------------------------------------------------------ prompts
    def build_prompts(
        self,
        waveforms: Sequence[Tensor],
        sample_rate: int,
        instruction: str,
        texts: Sequence[str | None] | None = None,
    ) -> Prompts:
        """Chat-template prompts with one audio each, through the processor (left-padded text).

        Each 1-D waveform is resampled to the feature extractor's rate when ``sample_rate`` differs, and
        cropped to the feature extractor's ``chunk_length`` seconds (the encoder takes a fixed-length
        window: 30 s for Qwen2-Audio). What is cropped is counted, per utterance in
        ``Prompts.seconds_ignored`` and in total in ``cropped_utterances`` / ``cropped_seconds``, and
        logged as a warning the first time. A transcript in ``texts[i]`` goes before the instruction.
        """
        self.load()
        fe = self.processor.feature_extractor
        if texts is not None and len(texts) != len(waveforms):
            raise ValueError(f"texts has {len(texts)} entries but there are {len(waveforms)} waveforms")
        audio, ignored = [], []
        for i, wave in enumerate(waveforms):
            wave = torch.as_tensor(wave, dtype=torch.float32)
            if wave.dim() != 1 or wave.numel() == 0:
                raise ValueError(f"waveforms[{i}] must be a non-empty 1-D tensor, got shape {tuple(wave.shape)}")
            if sample_rate != fe.sampling_rate:
                import torchaudio.functional as AF

                wave = AF.resample(wave, sample_rate, fe.sampling_rate)
            audio.append(wave[: fe.n_samples].cpu().numpy())
            ignored.append(max(wave.numel() - fe.n_samples, 0) / fe.sampling_rate)
        self._count_cropped(ignored, fe.n_samples / fe.sampling_rate)
        prompts = [self.processor.apply_chat_template(self._conversation(instruction, texts[i] if texts else None),
                                                      add_generation_prompt=True, tokenize=False)
                   for i in range(len(audio))]
        # The feature extractor computes in torch and converts to numpy, which has no bfloat16: keep it out
        # of a surrounding autocast (Lightning's bf16-mixed on CPU wraps the training step in one).
        with torch.autocast("cpu", enabled=False):
            out = self.processor(
                text=prompts, audio=audio, sampling_rate=fe.sampling_rate, padding=True, return_tensors="pt"
            )
        device = next(self._hf.parameters()).device
        return Prompts(
            input_ids=out["input_ids"],
            attention_mask=out["attention_mask"],
            input_features=out["input_features"].to(next(self._hf.parameters()).dtype),
            feature_attention_mask=out["feature_attention_mask"],
            seconds_ignored=tuple(ignored),
        ).to(device)

    def _conversation(self, instruction: str, transcript: str | None) -> list[dict]:
        """One user turn: the audio, then the (transcript and) instruction; the system prompt if set.

        The audio part carries an ``audio`` key because Qwen2-Audio's published chat template recognises
        audio by that key only ({"type": "audio"} alone renders no ``<|AUDIO|>``); the waveform itself goes
        to the processor separately. Qwen2.5-Omni's template accepts the same part.
        """
        text = f'Transcript: "{transcript}"\n{instruction}' if transcript else instruction
        conversation = [{"role": "user", "content": [{"type": "audio", "audio": "<waveform>"},
                                                     {"type": "text", "text": text}]}]
        if self.system_prompt is not None:
            conversation.insert(0, {"role": "system", "content": self.system_prompt})
        return conversation

    # Running totals of audio cropped to the encoder window (per policy instance, for callers to read).
    cropped_utterances: int = 0
    cropped_seconds: float = 0.0

    def _count_cropped(self, seconds_ignored: Sequence[float], window_seconds: float) -> None:
        """Add one batch's cropped audio to the totals; warn the first time any is cropped."""
        cropped = [s for s in seconds_ignored if s > 0]
        if not cropped:
            return
        if not self.cropped_utterances:
            log.warning(
                "%d of %d waveforms are longer than the encoder's %g s window: %.2f s of audio ignored (cropped). "
                "Warned once; the policy counts them in cropped_utterances / cropped_seconds, and predictions "
                "record seconds_ignored per file.", len(cropped), len(seconds_ignored), window_seconds, sum(cropped),
            )
        self.cropped_utterances += len(cropped)
        self.cropped_seconds += sum(cropped)

    def encode_prompts(self, prompts: Prompts) -> PromptEmbeds:
        """Run the audio tower once and merge: (B, P, D) prompt embeddings + the cached tower output."""
        self.load()
        with torch.no_grad():
            hidden = self._encode_audio(self._hf, prompts.input_features, prompts.feature_attention_mask)
        hidden = [h.detach() for h in hidden]
        embeds = self._merge(self._hf, prompts.input_ids, hidden)
        return PromptEmbeds(prompts.input_ids, prompts.attention_mask, embeds, hidden, prompts)

    def _prompt_embeds(self, hf_model: nn.Module, pe: PromptEmbeds, utts: Tensor, reference: bool) -> Tensor:
        """Prompt embeddings of utterances ``utts`` for ``hf_model``, re-using the cached tower output
        unless that tower is trainable (then: with grad for the policy, a cached pass for the reference copy)."""
        idx = utts.tolist()
        if reference and self.lora is None and self._tower_trainable(self._hf):
            if pe.ref_audio_hidden is None:
                p = pe.prompts
                pe.ref_audio_hidden = self._encode_audio(hf_model, p.input_features, p.feature_attention_mask)
            hidden = [pe.ref_audio_hidden[i] for i in idx]
        elif not reference and torch.is_grad_enabled() and self._tower_trainable(hf_model):
            p = pe.prompts
            hidden = self._encode_audio(hf_model, p.input_features[utts], p.feature_attention_mask[utts])
        else:
            hidden = [pe.audio_hidden[i] for i in idx]
        return self._merge(hf_model, pe.input_ids[utts], hidden)

    # ------------------------------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(
        self,
        prompts: Prompts | PromptEmbeds,
        group_size: int,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = 64,
        do_sample: bool = True,
        mask_truncated: bool = False,
        synced_gpus: bool | None = None,
    ) -> Rollout:
        """Sample ``group_size`` completions per prompt from the language model on cached prompt embeds.

        Rows are ``repeat_interleave``d: rows b*G .. b*G+G-1 belong to utterance b. The audio special
        tokens are suppressed (a sampled ``<|AUDIO|>`` would break re-scoring); generation stops at
        ``<|im_end|>`` or the tokenizer's eos. Decoding runs in ``_decode`` (a lean loop; sampling only by
        temperature / top-k / top-p, not ``generation_config``'s other processors such as a repetition
        penalty, which the log-probs would not include either), else in Hugging Face ``generate``.
        """
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.load()
        pe = prompts if isinstance(prompts, PromptEmbeds) else self.encode_prompts(prompts)
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
        if not do_sample:  # override sampling defaults from generation_config.json (avoids warnings)
            sampling = {"temperature": None, "top_p": None, "top_k": None}
        if synced_gpus is not None:
            sampling["synced_gpus"] = synced_gpus
        was_training = self._hf.training
        self._hf.eval()  # no dropout / checkpointing during sampling
        try:
            if getattr(self._hf, "rope_deltas", None) is not None:
                self._hf.rope_deltas = None  # Omni thinker: stale (rows, 1) deltas of its previous call
            if self._lean_decode and self._can_decode(pe):
                out = self._decode(pe, group_size, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                   temperature=temperature, top_k=top_k, top_p=top_p, synced_gpus=synced_gpus)
                return self._as_rollout(pe, out, group_size, mask_truncated)
            if group_size > 1:
                sampling["past_key_values"] = self._shared_prefill(pe, group_size)
            out = self._hf.generate(
                inputs_embeds=pe.inputs_embeds.repeat_interleave(group_size, 0),
                attention_mask=pe.attention_mask.repeat_interleave(group_size, 0),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                eos_token_id=self.eos_token_ids,
                pad_token_id=self.pad_token_id,
                suppress_tokens=self.audio_token_ids or None,
                use_cache=True,
                **sampling,
            )
        finally:
            self._hf.train(was_training)
        return self._as_rollout(pe, out if isinstance(out, Tensor) else out.sequences, group_size, mask_truncated)

    def _as_rollout(self, pe: PromptEmbeds, ids: Tensor, group_size: int, mask_truncated: bool) -> Rollout:
        mask = completion_mask(ids, self.eos_token_ids, mask_truncated=mask_truncated)
        ids = ids.masked_fill(completion_mask(ids, self.eos_token_ids) == 0, self.pad_token_id)
        texts = self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return Rollout(pe, ids, mask, is_truncated(ids, self.eos_token_ids), texts, group_size)

    # Off only to compare against Hugging Face ``generate`` (tests, benchmarks); ``_decode`` is the default.
    _lean_decode: bool = True

    def _can_decode(self, pe: PromptEmbeds) -> bool:
        """The lean loop needs a prompt of >= 2 tokens (one to prefill, one to feed) and a decoder that
        takes ``past_key_values``; otherwise ``rollout`` falls back to ``generate``."""
        if pe.inputs_embeds.shape[1] < 2:
            return False
        params = inspect.signature(self._decoder(self._hf).forward).parameters
        return "past_key_values" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def _decode(
        self,
        pe: PromptEmbeds,
        group_size: int,
        *,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float,
        top_k: int,
        top_p: float,
        synced_gpus: bool | None,
    ) -> Tensor:
        """``generate`` without its per-token overhead: (B*G, T) new token ids, pad after each row's first EOS.

            KV   = shared prefill of prompt[:, :P-1]  (B rows once, repeated G times)
            h_t  = decoder(x_t | KV) at position cumsum([mask ; 1])-1, x_0 = prompt[:, P-1], x_t = embed(c_{t-1})
            z_t  = lm_head(h_t) in float32, audio ids at -inf
            c_t  = argmax z_t (greedy)  or  c_t ~ softmax(top_p(top_k(z_t / temperature)))  (``warp_logits``)

        A finished row emits pad. Whether every row has finished is read every ``_STOP_CHECK_EVERY`` tokens
        only (each read is a host sync); T is then trimmed to the longest completion, as ``generate`` returns.
        With ``synced_gpus`` every rank must run the same number of decoder calls (FSDP all-gathers inside
        them): the stop flag is all-reduced when torch.distributed is up, else all ``max_new_tokens`` run.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if synced_gpus is None:  # as generate decides it: sharded and more than one rank
            synced_gpus = self.is_sharded and _world_size() > 1
        hf = self._hf
        fuse = self._can_fuse(self._decoder(hf), hf.lm_head)
        if fuse and self.is_sharded:
            # Hybrid engine: the weights are gathered once for the whole rollout; the fused step then issues
            # no collective per token, so ranks decode independently and may stop at different lengths.
            with gathered(hf):
                return self._decode_tokens(pe, group_size, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                           temperature=temperature, top_k=top_k, top_p=top_p, synced_gpus=False,
                                           fuse=True)
        return self._decode_tokens(pe, group_size, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                   temperature=temperature, top_k=top_k, top_p=top_p, synced_gpus=synced_gpus,
                                   fuse=fuse)

    def _decode_tokens(self, pe: PromptEmbeds, group_size: int, *, max_new_tokens: int, do_sample: bool,
                       temperature: float, top_k: int, top_p: float, synced_gpus: bool, fuse: bool) -> Tensor:
        """``_decode``'s loop (see there), with the fused step or the decoder's forward per token."""
        hf = self._hf
        decoder, embed, lm_head = self._decoder(hf), self._embed(hf), hf.lm_head
        cache = self._shared_prefill(pe, 1 if fuse else group_size)  # the fused step repeats it itself
        prompt_mask = pe.attention_mask.repeat_interleave(group_size, 0)
        n, p = prompt_mask.shape
        device = prompt_mask.device
        attention = torch.cat([prompt_mask, prompt_mask.new_ones(n, max_new_tokens)], dim=1)
        fused = None
        if fuse:
            fused = FusedDecodeStep(decoder, lm_head, [(c.keys, c.values) for c in cache.layers], attention,
                                    merge=self.fused_decode == "merged", repeat=group_size)
            del cache
        position = prompt_mask.long().sum(-1, keepdim=True) - 1  # of the last prompt token (left padding)
        x = pe.inputs_embeds[:, -1:].repeat_interleave(group_size, 0)
        eos = torch.tensor(self.eos_token_ids, device=device)
        suppress = torch.tensor(self.audio_token_ids, dtype=torch.long, device=device)
        ids = torch.full((n, max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        steps = max_new_tokens
        for t in range(max_new_tokens):
            if fused is not None:
                logits = fused(x, position + t)
            else:
                hidden = decoder(
                    inputs_embeds=x, attention_mask=attention[:, : p + t], position_ids=position + t,
                    past_key_values=cache, use_cache=True,
                ).last_hidden_state
                logits = lm_head(hidden[:, -1]).float()
            if suppress.numel():
                logits.index_fill_(-1, suppress, -float("inf"))
            if do_sample:
                probs = torch.softmax(warp_logits(logits, temperature, top_k, top_p), dim=-1)
                token = sample_categorical(probs)
            else:
                token = logits.argmax(-1)
            token = token.masked_fill(finished, self.pad_token_id)
            ids[:, t] = token
            finished |= torch.isin(token, eos)
            if t + 1 == max_new_tokens:
                break
            if (t + 1) % _STOP_CHECK_EVERY == 0 and _all_finished(finished, synced_gpus):
                steps = t + 1
                break
            x = embed(token).unsqueeze(1)
        ids = ids[:, :steps]
        hit = torch.isin(ids, eos)
        lengths = torch.where(hit.any(1), hit.int().argmax(1) + 1, steps)
        return ids[:, : int(lengths.max())]

    def _can_fuse(self, decoder: nn.Module, lm_head: nn.Module) -> bool:
        """Whether ``_decode`` may run ``FusedDecodeStep``: not "off", Qwen2 layers, plain LoRA or none (an
        FSDP2-sharded model too: ``_decode`` gathers its weights for the rollout)."""
        if self.fused_decode == "off":
            return False
        problem = unsupported_for_fusion(decoder, lm_head)
        if problem is not None and problem != self._fusion_refused:
            self._fusion_refused = problem  # said once per reason: rollouts then use the decoder's forward
            log.info("fused_decode: not for this model (%s); decoding with the decoder's own forward", problem)
        return problem is None

    _fusion_refused: str | None = None

    def _shared_prefill(self, pe: PromptEmbeds, group_size: int):
        """KV cache of the first P-1 prompt tokens, computed for the B prompts once and repeated G times.

        The G samples of one utterance share their prompt, so prefilling B*G identical rows is wasted work;
        ``generate`` then runs only the last prompt token per row (it skips the cached positions).
        Positions are cumsum(mask) - 1 as ``generate`` computes them (pad positions are masked anyway).
        """
        from transformers import DynamicCache

        cache = DynamicCache(config=self._hf.config.get_text_config())
        mask = pe.attention_mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        self._decoder(self._hf)(
            inputs_embeds=pe.inputs_embeds[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
            past_key_values=cache, use_cache=True,
        )
        if group_size > 1:
            cache.batch_repeat_interleave(group_size)
        return cache

    def greedy(
        self, prompts: Prompts | PromptEmbeds, max_new_tokens: int = 64, synced_gpus: bool | None = None
    ) -> list[str]:
        """Greedy decoding, one completion per prompt (evaluation)."""
        return self.rollout(prompts, 1, do_sample=False, max_new_tokens=max_new_tokens, synced_gpus=synced_gpus).texts

    def teacher_forcing(self, prompts: Prompts | PromptEmbeds, targets: Sequence[str]) -> Rollout:
        """A one-sample-per-prompt ``Rollout`` whose completions are the given target texts + EOS.

        Scored with ``completion_logps`` it gives the supervised (cold-start) log-likelihood.
        """
        self.load()
        pe = prompts if isinstance(prompts, PromptEmbeds) else self.encode_prompts(prompts)
        if len(targets) != len(pe):
            raise ValueError(f"got {len(targets)} targets for {len(pe)} prompts")
        tok = self.processor.tokenizer
        rows = [tok(t, add_special_tokens=False)["input_ids"] + [self.eos_token_ids[0]] for t in targets]
        width = max(len(r) for r in rows)
        device = pe.input_ids.device
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, device=device)
            mask[i, : len(r)] = 1
        truncated = torch.zeros(len(rows), dtype=torch.bool, device=device)
        return Rollout(pe, ids, mask, truncated, list(targets), 1)

    # ---------------------------------------------------------------------------------------- log-probs
    def completion_logps(
        self,
        rollout: Rollout,
        rows: slice | Tensor | Sequence[int] | None = None,
        *,
        temperature: float = 1.0,
        reference: bool = False,
        chunk_size: int = 1,
    ) -> Tensor:
        """Per-token log-probs of the completion tokens of the selected rows, (n, T).

            logp[i, t] = log softmax(lm(prompt_i ; c_i[:t]) / temperature)[c_i[t]]

        The language model runs on [prompt embeds ; embed(completion)] with positions cumsum(mask) - 1 (as
        ``generate``); only the T hidden states that predict completion tokens go through ``lm_head``.
        Differentiable in grad mode; ``reference=True`` scores under the reference policy with no grad.
        Positions after the first EOS are scored too: mask them with ``rollout.completion_mask``.

        The G rows of one utterance share their prompt, so the prompt runs once per utterance among the
        selected rows and its per-layer keys/values are indexed out to the rows (``_shared_prompt_hidden``);
        under gradient checkpointing, which drops caches, every row runs its full sequence instead.
        """
        self.load()
        n_rows = len(rollout)
        device = rollout.completion_ids.device
        r = _as_row_index(rows, n_rows, device)
        ctx = self.reference() if reference else contextlib.nullcontext(self._hf)
        grad = contextlib.nullcontext() if not reference else torch.no_grad()
        with grad, ctx as hf_model:
            pe = rollout.prompt
            utts, inverse = torch.unique(torch.div(r, rollout.group_size, rounding_mode="floor"), return_inverse=True)
            prompt_embeds = self._prompt_embeds(hf_model, pe, utts, reference)
            prompt_mask = pe.attention_mask[utts]
            completion = rollout.completion_ids[r]
            if self._share_prompt and self._can_share_prompt(hf_model, prompt_embeds.shape[1], completion.shape[1]):
                hidden = self._shared_prompt_hidden(hf_model, prompt_embeds, prompt_mask, inverse, completion)
            else:
                hidden = self._full_sequence_hidden(hf_model, prompt_embeds[inverse], prompt_mask[inverse], completion)
            logits = hf_model.lm_head(hidden)
            return token_logprobs(logits, completion, temperature=temperature, chunk_size=chunk_size)

    # Off only to compare against the full-sequence path (tests, benchmarks).
    _share_prompt: bool = True

    def _can_share_prompt(self, hf_model: nn.Module, prompt_len: int, completion_len: int) -> bool:
        """The cached-prompt path needs a prompt of >= 2 tokens, a completion, full attention in every layer
        (no sliding windows) and, where layers are checkpointed, non-reentrant checkpointing: the prompt's
        keys/values leave the checkpointed layer through the cache, which only that mode differentiates."""
        if prompt_len < 2 or completion_len < 1:
            return False
        if self.is_sharded and torch.is_grad_enabled():
            # FSDP2 reshards a unit after each forward; the decoder would run twice (prompt, completion)
            # before one backward, and the first graph's gathered weights would already be freed.
            return False
        text_config = hf_model.config.get_text_config()
        if any(kind != "full_attention" for kind in getattr(text_config, "layer_types", None) or ()):
            return False
        for layer in _checkpointed_layers(self._decoder(hf_model)):
            if getattr(layer._gradient_checkpointing_func, "keywords", {}).get("use_reentrant", True):
                return False
        return True

    def _full_sequence_hidden(self, hf_model: nn.Module, prompt_embeds: Tensor, prompt_mask: Tensor,
                              completion: Tensor) -> Tensor:
        """Final hidden states that predict the completion tokens, (n, T, D), from one pass per row over
        [prompt (n, P) ; completion (n, T)] at positions cumsum(mask) - 1; h[:, P-1+t] predicts c[t]."""
        embeds = torch.cat([prompt_embeds, self._embed(hf_model)(completion)], dim=1)
        attention = torch.cat([prompt_mask, torch.ones_like(completion)], dim=1)
        positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self._decoder(hf_model)(
            inputs_embeds=embeds, attention_mask=attention, position_ids=positions, use_cache=False
        ).last_hidden_state
        p, t = prompt_embeds.shape[1], completion.shape[1]
        return hidden[:, p - 1 : p + t - 1]

    def _shared_prompt_hidden(self, hf_model: nn.Module, prompt_embeds: Tensor, prompt_mask: Tensor,
                              inverse: Tensor, completion: Tensor) -> Tensor:
        """As ``_full_sequence_hidden`` for rows ``inverse`` of U unique prompts (U, P), prefilling each once.

            KV_l = decoder(prompt[:, :P-1]) keys/values of layer l, (U, H, P-1, d)  -> KV_l[inverse]
            h    = decoder([prompt[inverse, P-1] ; c[:, :T-1]] | KV) at positions (P-1 .. P+T-2) of
                   cumsum([mask ; 1]) - 1, so h[:, t] predicts c[t]

        The indexing is differentiable: in grad mode the prompt's gradients (LoRA, full fine-tuning, a
        trainable tower) sum over the rows that share it, as in the full-sequence pass. Both caches are
        replay-safe, so checkpointed layers may keep them (see ``_RecordingLayer``, ``_ReadOnlyLayer``).
        """
        decoder = self._decoder(hf_model)
        recorded = Cache(layer_class_to_replicate=_RecordingLayer)
        prompt_positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
        head = completion[:, :-1]
        attention = torch.cat([prompt_mask[inverse], torch.ones_like(head)], dim=1)
        positions = (attention.long().cumsum(-1) - 1).clamp(min=0)[:, prompt_embeds.shape[1] - 1 :]
        with _cache_through_checkpoints(decoder):
            decoder(
                inputs_embeds=prompt_embeds[:, :-1], attention_mask=prompt_mask[:, :-1],
                position_ids=prompt_positions[:, :-1], past_key_values=recorded, use_cache=False,
            )
            past = Cache(layers=[_ReadOnlyLayer(layer.keys[inverse], layer.values[inverse]) for layer in recorded.layers])
            embeds = torch.cat([prompt_embeds[inverse, -1:], self._embed(hf_model)(head)], dim=1)
            return decoder(
                inputs_embeds=embeds, attention_mask=attention, position_ids=positions, past_key_values=past,
                use_cache=False,
            ).last_hidden_state


def _full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) DTensor parameter."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: Tensor, target: Tensor) -> Tensor:
    """``full`` (the same on every rank) in ``target``'s dtype, device and, for a DTensor, its sharding."""
    full = full.to(device=target.device, dtype=target.dtype)
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, target.device_mesh, target.placements)
    return full


_STOP_CHECK_EVERY = 8  # decode steps between reads of the "all rows finished" flag (a host sync each)


def warp_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Sampling logits as Hugging Face's Temperature, TopK then TopP warpers make them (-inf = removed).

        z  = logits / temperature
        top-k: drop z_i < (k-th largest z)                                   (ties at the k-th are kept)
        top-p: sort ascending, c_j = cumsum softmax; drop the tokens with c_j <= 1 - top_p, never the largest,
               i.e. keep the smallest set of most likely tokens whose probability sums to >= top_p

    ``top_k = 0`` and ``top_p = 1`` switch those filters off.
    """
    z = logits / temperature if temperature != 1.0 else logits
    if top_k and top_k > 0:
        kth = torch.topk(z, min(top_k, z.shape[-1]), dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, -float("inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, descending=False, dim=-1)
        drop = sorted_z.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1:] = False
        z = z.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return z


def sample_categorical(probs: Tensor) -> Tensor:
    """One index per row of ``probs`` (n, V), rows proportional to probabilities, by inverse CDF:

        i = min { i : sum_{j <= i} p_j > u * sum_j p_j },   u ~ U[0, 1), one per row (float64 sums)

    An exact categorical draw (a zero-probability index is never the first to pass u) with one random
    number per row, where ``torch.multinomial`` does per-category work (~0.6 ms a call at 24 x 1024 on CPU).
    """
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=cdf.dtype, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_finished(finished: Tensor, synced_gpus: bool) -> bool:
    """Whether decoding may stop: every row here has finished and, with ``synced_gpus``, on every rank too
    (without an initialised process group a synced run never stops early)."""
    if not synced_gpus:
        return bool(finished.all())
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    flag = finished.all().to(torch.int32)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag)


class _RecordingLayer(DynamicLayer):
    """A cache layer that keeps the keys/values of its last update instead of appending them: a checkpointed
    layer's backward replay records equal states again rather than doubling the cache."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        self.keys, self.values = key_states, value_states
        return key_states, value_states


class _ReadOnlyLayer(DynamicLayer):
    """Fixed past keys/values (n, H, S, d): each update attends over [past ; new] and stores nothing, so a
    checkpointed layer's replay sees the same past."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.keys, self.values = keys, values

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def _checkpointed_layers(decoder: nn.Module) -> list[nn.Module]:
    """Layers that transformers runs under gradient checkpointing now (its flag, in training mode)."""
    return [m for m in decoder.modules() if getattr(m, "gradient_checkpointing", False) and m.training
            and hasattr(m, "_gradient_checkpointing_func")]


@contextlib.contextmanager
def _cache_through_checkpoints(decoder: nn.Module) -> Iterator[None]:
    """Let checkpointed layers keep ``past_key_values``: transformers drops it unless the layer says the cache
    is only read, which holds for the replay-safe caches of ``_shared_prompt_hidden``."""
    layers = _checkpointed_layers(decoder)
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class default
