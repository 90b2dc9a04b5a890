"""The audio-language-model policy: one facade over loading, LoRA, prompts, rollout, log-probs and reference.

The audio is encoded once per utterance: ``encode_prompts`` runs the audio tower and caches its output;
rollout and every later log-prob pass re-embed the text tokens and scatter the cached audio features into
the audio token positions, then run only the language model on ``inputs_embeds``. The work lives in:

    families.py   one adapter per model family (Qwen2-Audio, the Qwen2.5-Omni thinker): where its parts sit
    prompting.py  chat template + processor -> Prompts; long audio cropped and counted
    sampling.py   the decode loop (shared prefill, fused step, warping, stop sync) or ``generate``
    scoring.py    hidden states of completions with the prompt prefilled once per utterance
    reference.py  frozen reference copies, their sharding; folding LoRA into the base
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from emorl_pl.grpo import completion_mask, is_truncated
from emorl_pl.kernels import LOGITS_CHUNK_TOKENS, linear_token_logprobs, token_logprobs
from emorl_pl.modules import loading, sampling, scoring
from emorl_pl.modules import reference as ref_weights
from emorl_pl.modules.families import AudioLMFamily, family_for, import_class
from emorl_pl.modules.prompting import CroppedAudio, PromptEmbeds, Prompts, build_prompts
from emorl_pl.modules.sampling import (
    FUSED_DECODE_MODES,
    Rollout,
    SamplingSettings,
    SpecialTokens,
    sample_categorical,
    warp_logits,
)
from emorl_pl.modules.sharding import full_state_dict_cpu, is_sharded, shard_model
from emorl_pl.modules.vllm_engine import ROLLOUT_ENGINES, VLLMColocateEngine, VLLMSettings, pack_completions
from emorl_pl.modules.weight_sync import iter_merged_weights, write_hub_shards
from emorl_pl.rollout_server import ServerEngine

if TYPE_CHECKING:
    from emorl_pl.modules.hub_layout import HubConverter

__all__ = ["AudioLMPolicy", "LoraSettings", "PromptEmbeds", "Prompts", "Rollout", "sample_categorical",
           "warp_logits"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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
class LoadedModels:
    """What ``AudioLMPolicy.load`` / ``shard`` build, in one typed record that ``nn.Module`` does not register
    (so none of it enters the policy's ``state_dict``, ``parameters()`` or ``.to()``):

    ``hf``: the transformers model (LoRA injected in place; the trained weights, registered through the
    policy's ``model``); ``reference``: full fine-tuning's frozen reference (None with LoRA: the adapters off
    are the reference), set only by ``AudioLMPolicy._set_reference``; ``mesh`` / ``compute_dtype``: the
    FSDP2 mesh and compute dtype once sharded; ``pending_weights``: the file plan of a model built on the
    meta device whose weights are not read yet.
    """

    hf: nn.Module
    reference: nn.Module | None = None
    mesh: Any = None
    compute_dtype: torch.dtype | None = None
    pending_weights: loading.WeightPlan | None = None


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside, its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def disable_dropout(model: nn.Module) -> None:
    """Every dropout of ``model`` to 0: ``nn.Dropout`` modules (e.g. LoRA's) and the float rates that
    Hugging Face layers pass to ``F.dropout`` (``dropout``, ``attention_dropout``, ``activation_dropout``)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


class AudioLMPolicy(nn.Module):
    """A local Hugging Face audio-LM + processor as a GRPO policy (see the module docstring).

    Call ``load()`` (the Lightning module does it in ``configure_model``); other methods load lazily.
    Reference policy: with LoRA, the adapters disabled; with full fine-tuning, a frozen deep copy that is
    neither a registered submodule (not in ``state_dict``/``parameters``) nor trained.

    ``model_class``: the class to load, as a dotted import path; None takes the family's own. The family
    (``families.py``) is always chosen by ``config.model_type``; a type without an adapter is an error.

    ``fused_decode``: how the decode loop runs the language model per token (``fused_decode.py``). "adapters"
    (default): a fused step on the module's own weights, LoRA applied as peft does, no copies; "merged":
    LoRA merged and q|k|v, gate|up concatenated once per rollout (fastest; a copy of the LM's projection
    weights while sampling); "off": the decoder's own forward. Architectures the fused step does not
    cover always use the decoder's forward.

    ``dropout``: True (default, as TRL's ``disable_dropout: false``): the configured dropouts (LoRA's,
    the model's own) act in the gradient passes only; sampling, evaluation and scoring without gradient
    (the sampling policy's and the reference's log-probs) run in eval mode. False (TRL's
    ``disable_dropout: true``): every dropout is set to 0. Either way the policy is in training mode after
    ``load`` (Hugging Face gradient checkpointing only runs in training mode).

    ``rollout_engine``: "fused" (default) samples with the decode above; "vllm" with a colocated vLLM engine
    (``vllm_engine.py``; settings in ``vllm``): it gets the rendered prompt texts and the audio arrays,
    returns the sampled tokens with their sampling log-probs (``Rollout.sampling_logps``, for the module's
    importance-sampling correction), and gets the current weights (LoRA merged) whenever they changed since
    its last rollout. One process only in this version.
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
        fused_decode: Literal["adapters", "merged", "off"] = "adapters",
        dropout: bool = True,
        rollout_engine: Literal["fused", "vllm"] = "fused",
        vllm: VLLMSettings | None = None,
    ) -> None:
        super().__init__()
        if not Path(model_dir).is_dir():
            # Fail at config time, before anything is loaded.
            raise FileNotFoundError(
                f"model.init_args.policy.init_args.model_dir={model_dir!r} does not exist (a local Hugging Face "
                "model folder is expected; `emorl-toy-model DIR` builds the quickstart's toy model there)"
            )
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if fused_decode not in FUSED_DECODE_MODES:
            raise ValueError(f"fused_decode must be one of {list(FUSED_DECODE_MODES)}, got {fused_decode!r}")
        if rollout_engine not in ROLLOUT_ENGINES:
            raise ValueError(f"rollout_engine must be one of {list(ROLLOUT_ENGINES)}, got {rollout_engine!r}")
        self.rollout_engine = rollout_engine
        self.vllm_settings = vllm if vllm is not None else VLLMSettings()
        self._engine: VLLMColocateEngine | None = None  # built at the first vLLM rollout
        self._engine_weights_dir: Path | None = None
        self._engine_synced_version = -1  # sum of the parameters' in-place update counters at the last sync
        self._engine_layout: HubConverter | None = None  # built at the first sync (writing rank)
        self.model_dir = model_dir
        self.model_class = model_class
        self.dtype_name = dtype
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self.lora = lora
        self.freeze_audio_tower = freeze_audio_tower
        self.system_prompt = system_prompt
        self.fused_decode = fused_decode
        self.dropout = dropout
        self.model: nn.Module | None = None
        self.loaded_models: LoadedModels | None = None  # what load() builds (outside the module registry)
        self.processor = None
        self.family: AudioLMFamily | None = None
        self.cropped = CroppedAudio()

    # ------------------------------------------------------------------------------------------ loading
    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self, reference: bool = True, weights: MutableMapping[str, Tensor] | None = None) -> AudioLMPolicy:
        """Load processor and model from ``model_dir``, apply freezing, LoRA, checkpointing. Idempotent.

        ``reference=False``: the model is about to be sharded (``shard`` follows, as in ``configure_model``). It
        is built on the meta device and LoRA-wrapped there; ``shard`` then reads each rank's shards of the
        weights straight from the files (``loading.py``), so that no rank holds the whole model in host memory,
        and with full fine-tuning builds a sharded reference (no frozen copy here). Any use before ``shard``
        (``load()`` with the default ``reference=True``) reads the weights in full first.

        ``weights``: tensors by this policy's ``state_dict`` names (a checkpoint's trained weights) in place of
        ``model_dir``'s: only the other weights are read from the files, so that no base copy of these is ever
        in memory (``emorl-export``); entries are removed from the mapping as they are copied. Needs a policy
        not loaded yet. A folder that cannot be read shard by shard (``loading.LeanLoadingUnsupported``, e.g. no
        safetensors) is loaded in full, with a warning.
        """
        if self.loaded:
            if weights is not None:
                raise ValueError("load(weights=...) needs a policy whose model is not loaded yet")
            if reference and self.loaded_models.pending_weights is not None:
                self._finish_loading(reference=True)
            return self
        from transformers import AutoConfig

        path = Path(self.model_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"model_dir {str(path)!r} does not exist or is not a directory")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model_dir {str(path)!r} has no config.json (not a saved HF model)")
        self.family = family_for(AutoConfig.from_pretrained(path).model_type, str(path / "config.json"))
        kwargs = {"dtype": DTYPES[self.dtype_name]}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        model_class = import_class(self.model_class or self.family.model_class)
        plan = None
        if not reference or weights is not None:  # no whole copy: built on meta, weights read later
            try:
                hf_model, plan = loading.meta_model_and_plan(model_class, path, **kwargs)
            except loading.LeanLoadingUnsupported as why:
                loading.log.warning("loading %s in full (%s)", path, why)
        if plan is None:
            hf_model = model_class.from_pretrained(path, **kwargs)
        self.processor = self.family.load_processor(path)  # the Omni processors need no torchvision here
        self.family.check_model(hf_model, str(path / "config.json"))
        self.processor.tokenizer.padding_side = "left"  # generation appends on the right

        # The unwrapped model in a plain record, not registered: peft injects LoRA into it in place and
        # registers the wrapper as self.model.
        self.loaded_models = LoadedModels(hf_model)
        if self.freeze_audio_tower:
            self.family.audio_tower(hf_model).requires_grad_(False)
        if self.lora is None and reference and plan is None:
            # not registered: out of state_dict and the optimizer
            self._set_reference(ref_weights.frozen_copy(hf_model))

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
                exclude_modules=self._lora_excludes(hf_model),
                bias="none",
            )
            with loading.adapters_off_meta(hf_model) if plan is not None else contextlib.nullcontext():
                self.model = get_peft_model(hf_model, lora_config)
        else:
            self.model = hf_model
        if not self.dropout:
            disable_dropout(self.model)
        self.model.train()  # from_pretrained returns eval mode; Lightning trains what it is given
        self._token_ids()
        # LoRA made its adapters (real, on the CPU) on the meta model: bound by their names after wrapping.
        self.loaded_models.pending_weights = plan.bind(hf_model) if plan is not None else None
        if weights is not None:
            if plan is None:
                self._load_weights_in_place(weights)
            else:
                self._finish_loading(reference=reference, weights=weights)
        return self


    def _finish_loading(self, reference: bool, weights: MutableMapping[str, Tensor] | None = None) -> None:
        """Read the weights of a model that ``load`` built on the meta device, in full (unsharded, on the CPU);
        ``weights`` (policy names) in place of the files'. Full fine-tuning with ``reference``: the frozen copy."""
        plan = self.loaded_models.pending_weights
        by_hf_name = self._by_hf_name(weights) if weights is not None else None
        self.loaded_models.pending_weights = None
        loading.materialize(self.loaded_models.hf, plan, torch.device("cpu"), by_hf_name)
        if self.lora is None and reference:
            self._set_reference(ref_weights.frozen_copy(self.loaded_models.hf))

    def _by_hf_name(self, weights: MutableMapping[str, Tensor]) -> dict[str, Tensor]:
        """``weights`` (this policy's ``state_dict`` names) by the unwrapped model's names; moved out of
        ``weights``. KeyError for names that are not this policy's tensors."""
        def named(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
            yield from module.named_parameters(remove_duplicate=False)
            yield from module.named_buffers(remove_duplicate=False)

        hf_names = {id(t): name for name, t in named(self.loaded_models.hf)}
        names = {name: hf_names[id(t)] for name, t in named(self) if id(t) in hf_names}
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise KeyError(f"{len(unknown)} weights are not tensors of this policy, e.g. {unknown[:3]}")
        return {names[key]: weights.pop(key) for key in list(weights)}

    def _load_weights_in_place(self, weights: MutableMapping[str, Tensor]) -> None:
        """``weights`` (policy names) copied into the loaded model; KeyError for names that are not its."""
        result = self.load_state_dict(dict(weights), strict=False)
        if result.unexpected_keys:
            raise KeyError(f"{len(result.unexpected_keys)} weights are not tensors of this policy, e.g. "
                           f"{result.unexpected_keys[:3]}")
        weights.clear()

    def _lora_targets(self, hf_model: nn.Module) -> str:
        """A regex over full module names that matches only projections inside the language model."""
        if isinstance(self.lora.target_modules, str):
            return self.lora.target_modules
        names = tuple(self.lora.target_modules or LM_PROJECTIONS)
        decoder = self.family.decoder(hf_model)
        prefix = next(name for name, module in hf_model.named_modules() if module is decoder)
        return rf"^{re.escape(prefix)}\.layers\.\d+\..*\.({'|'.join(map(re.escape, names))})$"

    def _lora_excludes(self, hf_model: nn.Module) -> str | None:
        """Every module outside the language model's layers, and a mixture-of-experts model's experts (None for a
        raw peft regex). peft 0.21 turns the target regex of a mixture-of-experts model (Qwen3-Omni) into bare
        projection names, which the audio and vision towers' attention also have, and adapts the fused 3-D expert
        weights through parameter wrappers, which folding and merging (``reference``, ``merged_state_dict``) do
        not handle: the adapters stay on the language model's attention and dense projections."""
        if isinstance(self.lora.target_modules, str):
            return None
        decoder = self.family.decoder(hf_model)
        prefix = next(name for name, module in hf_model.named_modules() if module is decoder)
        outside = rf"(?!{re.escape(prefix)}\.layers\.\d+\.).*"
        return outside + r"|.*\.mlp\.experts(\..*)?" if self.family.router_settings(hf_model) else outside

    def _token_ids(self) -> None:
        tok = self.processor.tokenizer
        vocab = tok.get_vocab()
        self.audio_token_ids = sorted({vocab[t] for t in self.family.audio_token_names if t in vocab})
        eos = [vocab[t] for t in ("<|im_end|>",) if t in vocab]
        if tok.eos_token_id is not None:
            eos.append(tok.eos_token_id)
        self.eos_token_ids = list(dict.fromkeys(eos))
        if not self.eos_token_ids:
            raise ValueError(f"{self.model_dir}: tokenizer has neither <|im_end|> nor an eos_token")
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_ids[0]

    @property
    def hf_model(self) -> nn.Module:
        """The underlying transformers model (LoRA layers injected in place when LoRA is on)."""
        self.load()
        return self.loaded_models.hf

    def trainable_parameters(self) -> list[nn.Parameter]:
        self.load()
        return [p for p in self.model.parameters() if p.requires_grad]

    def run_identity(self) -> dict[str, Any]:
        """The policy settings a checkpoint's weights depend on (``emorl_pl.run_identity``): the model family
        and vocabulary (from ``config.json``, without loading weights), LoRA and which parts train."""
        family = vocab = None
        if (Path(self.model_dir) / "config.json").is_file():
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self.model_dir)
            family, vocab = config.model_type, config.get_text_config().vocab_size
        return {"policy.family": family, "policy.vocab_size": vocab, "policy.lora": self.lora,
                "policy.freeze_audio_tower": self.freeze_audio_tower}

    def trainable_parameter_names(self) -> list[str]:
        """Names (relative to this policy, as in its ``state_dict``) of the parameters being trained."""
        return [name for name, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------ prompts
    def build_prompts(
        self,
        waveforms: Sequence[Tensor],
        sample_rate: int,
        instruction: str | Sequence[str],
        texts: Sequence[str | None] | None = None,
        system_prompts: Sequence[str | None] | None = None,
    ) -> Prompts:
        """Chat-template prompts with one audio each, on the model's device (``prompting.build_prompts``);
        ``instruction`` for all rows or one per row; ``system_prompts`` per row (None entries, or None:
        this policy's ``system_prompt``).

        Audio past the encoder window is cropped: per utterance in ``Prompts.seconds_ignored``, in total in
        ``cropped_utterances`` / ``cropped_seconds``, logged as a warning the first time.
        """
        self.load()
        param = next(self.loaded_models.hf.parameters())
        systems = self.system_prompt if system_prompts is None else [
            self.system_prompt if s is None else s for s in system_prompts]
        return build_prompts(self.processor, waveforms, sample_rate, instruction, texts,
                             system_prompt=systems, cropped=self.cropped, device=param.device, dtype=param.dtype)

    @property
    def cropped_utterances(self) -> int:
        return self.cropped.utterances

    @property
    def cropped_seconds(self) -> float:
        return self.cropped.seconds

    def encode_prompts(self, prompts: Prompts) -> PromptEmbeds:
        """Run the audio tower once and merge: (B, P, D) prompt embeddings + the cached tower output."""
        self.load()
        # Eval mode, as every pass without gradient: no dropout, and no random draws (the audio encoder's
        # layer drop samples torch.rand per layer in training mode, shifting the sampling RNG).
        with torch.no_grad(), _eval_mode(self.model):
            # Prefill, decode and scoring give the decoder the text positions: the model's own must agree.
            self.family.check_positions(self.loaded_models.hf, prompts.input_ids, prompts.attention_mask,
                                        prompts.feature_attention_mask)
            hidden = self.family.encode_audio(self.loaded_models.hf, prompts.input_features, prompts.feature_attention_mask)
        hidden = [h.detach() for h in hidden]
        embeds = self.family.merge(self.loaded_models.hf, prompts.input_ids, hidden)
        return PromptEmbeds(prompts.input_ids, prompts.attention_mask, embeds, hidden, prompts)

    def _prompt_embeds(self, hf_model: nn.Module, pe: PromptEmbeds, utts: Tensor, reference: bool) -> Tensor:
        """Prompt embeddings of utterances ``utts`` for ``hf_model``, re-using the cached tower output
        unless that tower is trainable (then: with grad for the policy, a cached pass for the reference copy)."""
        idx = utts.tolist()
        if reference and self.lora is None and self._tower_trainable(self.loaded_models.hf):
            if pe.ref_audio_hidden is None:
                p = pe.prompts
                pe.ref_audio_hidden = self.family.encode_audio(hf_model, p.input_features, p.feature_attention_mask)
            hidden = [pe.ref_audio_hidden[i] for i in idx]
        elif not reference and torch.is_grad_enabled() and self._tower_trainable(hf_model):
            p = pe.prompts
            hidden = self.family.encode_audio(hf_model, p.input_features[utts], p.feature_attention_mask[utts])
        else:
            hidden = [pe.audio_hidden[i] for i in idx]
        return self.family.merge(hf_model, pe.input_ids[utts], hidden)

    def _tower_trainable(self, hf_model: nn.Module) -> bool:
        return any(p.requires_grad for p in self.family.audio_tower(hf_model).parameters())

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
        ``<|im_end|>`` or the tokenizer's eos. Sampling is by temperature / top-k / top-p only, not ``generation_config``'s other processors such as a repetition penalty, which the
        log-probs would not include either; a model the loop cannot drive decodes with ``generate``.
        """
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.load()
        pe = prompts if isinstance(prompts, PromptEmbeds) else self.encode_prompts(prompts)
        tokens = SpecialTokens(self.eos_token_ids, self.pad_token_id, self.audio_token_ids)
        settings = SamplingSettings(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                    top_k=top_k, top_p=top_p, synced_gpus=synced_gpus)
        if self.rollout_engine == "vllm":
            return self._engine_rollout(pe, group_size, settings, mask_truncated)
        with _eval_mode(self.loaded_models.hf):  # no dropout / checkpointing during sampling
            self.family.reset_state(self.loaded_models.hf)
            if sampling.loop_supported(self.family.decoder(self.loaded_models.hf), pe):
                ids = sampling.decode(self.loaded_models.hf, self.family, pe, group_size, tokens, settings,
                                      fused_decode=self.fused_decode, sharded=self.is_sharded)
            else:
                ids = sampling.generate(self.loaded_models.hf, self.family, pe, group_size, tokens, settings)
        return self._rollout_from_ids(pe, ids, group_size, mask_truncated)

    def _rollout_from_ids(self, pe: PromptEmbeds, ids: Tensor, group_size: int, mask_truncated: bool,
                          sampling_logps: Tensor | None = None) -> Rollout:
        """A ``Rollout`` from sampled ids (B*G, T), whichever engine drew them: masks, padding after the stop
        token, truncation and texts."""
        mask = completion_mask(ids, self.eos_token_ids, mask_truncated=mask_truncated)
        ids = ids.masked_fill(completion_mask(ids, self.eos_token_ids) == 0, self.pad_token_id)
        texts = self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return Rollout(pe, ids, mask, is_truncated(ids, self.eos_token_ids), texts, group_size,
                       sampling_logps=sampling_logps)

    # ------------------------------------------------------------------------------------------ vLLM engine
    def _engine_rollout(self, pe: PromptEmbeds, group_size: int, settings: SamplingSettings,
                        mask_truncated: bool) -> Rollout:
        """``rollout`` on the vLLM engine: same prompts, same sampling; per-request seeds from torch's RNG,
        which the module seeds per step and rank (``seeded_rng``), so a resumed run draws the same seeds."""
        engine = self.engine()
        self.sync_engine_weights()
        prompts = pe.prompts
        if len(prompts.texts) != len(prompts) or len(prompts.audio) != len(prompts):
            raise ValueError("rollout_engine='vllm' needs prompts from build_prompts (their texts and audio)")
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        samples = engine.sample(prompts.texts, prompts.audio, self.processor.feature_extractor.sampling_rate,
                                group_size, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                top_p=settings.top_p, top_k=settings.top_k, greedy=not settings.do_sample, seeds=seeds)
        engine.release()  # sleep mode: the update that follows gets the engine's memory
        ids, logps = pack_completions(samples, settings.max_new_tokens, self.pad_token_id)
        device = pe.input_ids.device
        return self._rollout_from_ids(pe, ids.to(device), group_size, mask_truncated,
                                      sampling_logps=logps.to(device) if settings.do_sample else None)

    def engine(self) -> VLLMColocateEngine | ServerEngine:
        """The vLLM engine: colocated over ``model_dir``, or the client of an ``emorl-rollout-server`` (built
        once; the weights are synced before each use)."""
        if self._engine is None:
            self.load()
            if self.vllm_settings.mode == "server":
                self._engine = ServerEngine(self.vllm_settings.server_url)
            else:
                if _world_size() > 1:  # each rank would hold an engine with its own whole copy of the model
                    raise NotImplementedError("a colocated vLLM engine runs on one process in this version; with "
                                              "several ranks (DDP or FSDP2) use vllm: {mode: server, server_url: ...}")
                self._engine = VLLMColocateEngine(self.model_dir, self.vllm_settings,
                                                  stop_token_ids=self.eos_token_ids,
                                                  suppressed_token_ids=self.audio_token_ids)
        return self._engine

    def _weights_version(self) -> int:
        # Every in-place update (optimizer step, cold-start fold, checkpoint load) bumps a tensor's counter.
        return sum(p._version for p in self.loaded_models.hf.parameters())

    def sync_engine_weights(self) -> bool:
        """Give the engine the current weights (LoRA merged, out of place) if they changed since the last sync;
        returns whether it did. Streamed one weight at a time (gathered one by one under FSDP2) into
        safetensors shards in the hub layout in a scratch folder, which vLLM reloads in place."""
        engine = self.engine()
        version = self._weights_version()
        changed = version != self._engine_synced_version
        ranks = _world_size()
        if ranks > 1:  # one server for every rank: all agree, rank 0 sends, the others wait for it
            flag = torch.tensor([int(changed)], device=next(self.loaded_models.hf.parameters()).device)  # NCCL: on the GPU
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            changed = bool(flag.item())
        if not changed:
            return False
        writer = ranks == 1 or torch.distributed.get_rank() == 0
        if writer and self._engine_weights_dir is None:
            import tempfile

            root = self.vllm_settings.weights_dir
            if root is not None:
                Path(root).mkdir(parents=True, exist_ok=True)
            self._engine_weights_dir = Path(tempfile.mkdtemp(prefix="emorl-vllm-weights-", dir=root))
        if writer and self._engine_layout is None:  # in-memory -> published tensors: fixed for the model
            from emorl_pl.modules.hub_layout import HubConverter, meta_model

            self._engine_layout = HubConverter(meta_model(self.model_dir))
        # Under FSDP2 every rank takes part in each weight's all-gather (in the compute dtype); rank 0 converts
        # (renames; splits Qwen3-Omni's fused expert weights per expert) and writes.
        write_hub_shards(iter_merged_weights(self.loaded_models.hf, self.loaded_models.compute_dtype, to_cpu=writer),
                         self._engine_layout or {}, self._engine_weights_dir if writer else None)
        if writer:
            engine.load_weights(self._engine_weights_dir)
        if ranks > 1:
            torch.distributed.barrier()  # no rank samples before the server has the new weights
        self._engine_synced_version = version
        return True

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
        router_aux_loss: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Per-token log-probs of the completion tokens of the selected rows, (n, T).

            logp[i, t] = log softmax(lm(prompt_i ; c_i[:t]) / temperature)[c_i[t]]

        The language model runs on [prompt embeds ; embed(completion)] with positions cumsum(mask) - 1 (as
        ``generate``); only the T hidden states that predict completion tokens go through ``lm_head``.
        Differentiable in grad mode; ``reference=True`` scores under the reference policy with no grad.
        Positions after the first EOS are scored too: mask them with ``rollout.completion_mask``.

        The G rows of one utterance share their prompt, so the prompt runs once per
        utterance among the selected rows and its per-layer keys/values are indexed out to the rows
        (``scoring.shared_prompt_hidden``); where that cannot apply every row runs its full sequence.

        ``router_aux_loss`` (a mixture-of-experts policy, not the reference): also return the router's load-
        balancing loss of the pass (``family.router_aux_loss``, transformers' ``load_balancing_loss_func``) over
        the tokens the model's forward on the rows' full sequences would count, as TRL's ``outputs.aux_loss``:
        each row's prompt under its attention mask and its completion under ``rollout.completion_mask``
        (a shared prompt counted once per row), recorded by ``family.record_router_logits``. Otherwise no router
        logits are recorded, whatever the config's ``output_router_logits`` says.
        """
        self.load()
        if router_aux_loss and reference:
            raise ValueError("completion_logps: the reference policy's passes compute no load-balancing loss")
        r = scoring.as_row_index(rows, len(rollout), rollout.completion_ids.device)
        ctx = self.reference() if reference else contextlib.nullcontext(self.loaded_models.hf)
        grad = contextlib.nullcontext() if not reference else torch.no_grad()
        # Scoring without a gradient (old / reference log-probs) never uses dropout.
        mode = contextlib.nullcontext() if torch.is_grad_enabled() and not reference else _eval_mode(self.model)
        with grad, mode, ctx as hf_model:
            pe = rollout.prompt
            utts, inverse = torch.unique(torch.div(r, rollout.group_size, rounding_mode="floor"), return_inverse=True)
            completion = rollout.completion_ids[r]
            hidden, router = scoring.completion_hidden(
                self.family.decoder(hf_model), self.family.embed(hf_model),
                self._prompt_embeds(hf_model, pe, utts, reference), pe.attention_mask[utts], inverse, completion,
                sharded=self.is_sharded, decoder_kwargs=self.family.scoring_kwargs(hf_model),
                router_mask=rollout.completion_mask[r] if router_aux_loss else None,
                record_routers=(lambda: self.family.record_router_logits(hf_model)) if router_aux_loss else None,
            )
            head = hf_model.lm_head
            if type(head) is nn.Linear:  # never the (n, T, V) logits: lm_head runs in row chunks
                rows = max(chunk_size, LOGITS_CHUNK_TOKENS // max(1, completion.shape[1]))
                logps = linear_token_logprobs(hidden, head.weight, head.bias, completion, temperature, rows)
            else:
                # An FSDP2 unit (its forward gathers the weight and its backward reduces the gradient) or an
                # adapted head: through its own forward.
                logps = token_logprobs(head(hidden), completion, temperature=temperature, chunk_size=chunk_size)
            if router is None:
                return logps
            return logps, self.family.router_aux_loss(hf_model, router.logits, router.weights)

    # ---------------------------------------------------------------------------------------- reference
    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """Inside, forward passes use the reference policy: adapters off (LoRA) or the frozen copy."""
        self.load()
        if self.lora is not None:
            with self.model.disable_adapter():
                yield self.loaded_models.hf
            return
        ref = self.loaded_models.reference
        param, ref_param = next(self.loaded_models.hf.parameters()), next(ref.parameters())
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
            ref = self.loaded_models.reference
            ref_weights.copy_local_shards(self.loaded_models.hf, ref)
            state = full_state_dict_cpu(ref)  # a collective: every rank gathers, rank 0 keeps it all
            if save_dir is not None:
                ref.save_pretrained(save_dir, state_dict=state)
                self.processor.save_pretrained(save_dir)
            return
        ref = ref_weights.frozen_copy(self.loaded_models.hf)
        self._set_reference(ref)
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
        self._set_reference(None)  # free the old one before the new one is read
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
        return ref_weights.fold_adapters_into_base(self.model)

    def fold_into_base(self, folded: dict[str, Tensor]) -> None:
        """Add ``scaling * B @ A`` of each folded adapter (``fold_adapters_into_base``'s output) to its base
        weight; the adapters themselves are left as they are."""
        self.load()
        ref_weights.fold_into_base(self.model, folded)

    def _load_frozen(self, model_dir: str | Path) -> nn.Module:
        """A frozen copy of the model in ``model_dir`` (the reference). Sharded policy: in the compute dtype,
        sharded like the policy, each rank reading only its own shards from the files (no whole copy)."""
        dtype = self.loaded_models.compute_dtype if self.is_sharded and self.loaded_models.compute_dtype is not None else DTYPES[self.dtype_name]
        kwargs = {"dtype": dtype}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        model_class = import_class(self.model_class or self.family.model_class)
        if self.loaded_models.mesh is None:
            return ref_weights.load_frozen(model_class, model_dir, **kwargs)
        return ref_weights.load_frozen_sharded(model_class, model_dir, self.family, self.loaded_models.mesh, **kwargs)

    def _set_reference(self, ref: nn.Module | None) -> None:
        """The one place the frozen reference is set (full fine-tuning; None drops it, to free its memory
        before the next is built). Not registered: out of state_dict and the optimizer; sharded like the policy
        when the policy is."""
        if ref is not None and self.loaded_models.mesh is not None:
            ref_weights.shard_like_policy(ref, self.family, self.loaded_models.mesh)
        self.loaded_models.reference = ref


    # ---------------------------------------------------------------------------------------- sharding
    @property
    def is_sharded(self) -> bool:
        return self.loaded and is_sharded(self.loaded_models.hf)

    def shard(self, mesh, mp_policy=None) -> None:
        """FSDP2: each transformer block, then every module called outside the root forward, then the root;
        ``mp_policy``: FSDP2's ``MixedPrecisionPolicy`` (compute / reduce dtypes), or None.

        A policy loaded with ``load(reference=False)`` (as ``configure_model`` does) is sharded on the meta
        device, then each rank reads only its own shards from ``model_dir`` (``loading.py``): no rank ever
        holds the whole model. Full fine-tuning: the frozen reference is built the same way, sharded like the
        policy, in the compute dtype (1/R of it per rank).
        """
        self.load(reference=False)
        # The family's list, not direct_call_modules(): that loads a model still on meta in full.
        units = list(self.family.direct_call_modules(self.loaded_models.hf).values())
        plan = self.loaded_models.pending_weights
        if plan is None:
            shard_model(self.loaded_models.hf, mesh, extra_units=units, mp_policy=mp_policy)
        else:
            shard_model(self.loaded_models.hf, mesh, extra_units=units, mp_policy=mp_policy, init_root=False)
            self.loaded_models.pending_weights = None
            loading.materialize(self.loaded_models.hf, plan, loading.mesh_device(mesh))
        self.loaded_models.mesh = mesh
        self.loaded_models.compute_dtype = mp_policy.param_dtype if mp_policy is not None else None
        if self.lora is None:
            self._set_reference(None)  # drop an unsharded one before the next load
            self._set_reference(self._load_frozen(self.model_dir))

    def direct_call_modules(self) -> dict[str, nn.Module]:
        """Submodules that ``completion_logps`` / ``encode_prompts`` call directly, bypassing the root forward.

        Under FSDP2 (``fully_shard``) each must be (inside) its own sharded unit, not only the root's,
        or their parameters are never all-gathered: shard the decoder layers, then these, then the root.
        """
        self.load(reference=False)  # picks the family; no reference, and no weights read before a shard()
        return self.family.direct_call_modules(self.loaded_models.hf)
