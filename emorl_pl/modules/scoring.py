"""Scoring completions: the final hidden states that predict each completion token, from one pass per row
over [prompt ; completion] or, sharing each prompt among its rows, a prompt prefill whose keys/values are
indexed out to the rows (with the cache layers that keep that replay-safe under gradient checkpointing)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer


def as_row_index(rows: slice | Tensor | Sequence[int] | None, n: int, device: torch.device) -> Tensor:
    """``rows`` (None = all, a slice, indices or a bool mask) as a 1-D index among ``n`` rollout rows."""
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


def completion_hidden(
    decoder: nn.Module,
    embed: nn.Module,
    prompt_embeds: Tensor,
    prompt_mask: Tensor,
    inverse: Tensor,
    completion: Tensor,
    *,
    share_prompt_kv: bool = True,
    sharded: bool = False,
) -> Tensor:
    """Final hidden states that predict ``completion`` (n, T), (n, T, D), for rows whose prompts are rows
    ``inverse`` of the U unique ``prompt_embeds`` (U, P, D): each prompt prefilled once where
    ``can_share_prompt`` allows (and ``share_prompt_kv``), else one full pass per row."""
    if share_prompt_kv and can_share_prompt(decoder, prompt_embeds.shape[1], completion.shape[1], sharded):
        return shared_prompt_hidden(decoder, embed, prompt_embeds, prompt_mask, inverse, completion)
    return full_sequence_hidden(decoder, embed, prompt_embeds[inverse], prompt_mask[inverse], completion)


def can_share_prompt(decoder: nn.Module, prompt_len: int, completion_len: int, sharded: bool) -> bool:
    """The cached-prompt path needs a prompt of >= 2 tokens, a completion, full attention in every layer
    (no sliding windows) and, where layers are checkpointed, non-reentrant checkpointing: the prompt's
    keys/values leave the checkpointed layer through the cache, which only that mode differentiates."""
    if prompt_len < 2 or completion_len < 1:
        return False
    if sharded and torch.is_grad_enabled():
        # FSDP2 reshards a unit after each forward; the decoder would run twice (prompt, completion)
        # before one backward, and the first graph's gathered weights would already be freed.
        return False
    if any(kind != "full_attention" for kind in getattr(decoder.config, "layer_types", None) or ()):
        return False
    for layer in checkpointed_layers(decoder):
        if getattr(layer._gradient_checkpointing_func, "keywords", {}).get("use_reentrant", True):
            return False
    return True


def full_sequence_hidden(decoder: nn.Module, embed: nn.Module, prompt_embeds: Tensor, prompt_mask: Tensor,
                         completion: Tensor) -> Tensor:
    """Final hidden states that predict the completion tokens, (n, T, D), from one pass per row over
    [prompt (n, P) ; completion (n, T)] at positions cumsum(mask) - 1; h[:, P-1+t] predicts c[t]."""
    embeds = torch.cat([prompt_embeds, embed(completion)], dim=1)
    attention = torch.cat([prompt_mask, torch.ones_like(completion)], dim=1)
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    hidden = decoder(
        inputs_embeds=embeds, attention_mask=attention, position_ids=positions, use_cache=False
    ).last_hidden_state
    p, t = prompt_embeds.shape[1], completion.shape[1]
    return hidden[:, p - 1 : p + t - 1]


def shared_prompt_hidden(decoder: nn.Module, embed: nn.Module, prompt_embeds: Tensor, prompt_mask: Tensor,
                         inverse: Tensor, completion: Tensor) -> Tensor:
    """As ``full_sequence_hidden`` for rows ``inverse`` of U unique prompts (U, P), prefilling each once.

        KV_l = decoder(prompt[:, :P-1]) keys/values of layer l, (U, H, P-1, d)  -> KV_l[inverse]
        h    = decoder([prompt[inverse, P-1] ; c[:, :T-1]] | KV) at positions (P-1 .. P+T-2) of
               cumsum([mask ; 1]) - 1, so h[:, t] predicts c[t]

    The indexing is differentiable: in grad mode the prompt's gradients (LoRA, full fine-tuning, a
    trainable tower) sum over the rows that share it, as in the full-sequence pass. Both caches are
    replay-safe, so checkpointed layers may keep them (see ``_RecordingLayer``, ``_ReadOnlyLayer``).
    """
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
        embeds = torch.cat([prompt_embeds[inverse, -1:], embed(head)], dim=1)
        return decoder(
            inputs_embeds=embeds, attention_mask=attention, position_ids=positions, past_key_values=past,
            use_cache=False,
        ).last_hidden_state


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


def checkpointed_layers(decoder: nn.Module) -> list[nn.Module]:
    """Layers that transformers runs under gradient checkpointing now (its flag, in training mode)."""
    return [m for m in decoder.modules() if getattr(m, "gradient_checkpointing", False) and m.training
            and hasattr(m, "_gradient_checkpointing_func")]


@contextlib.contextmanager
def _cache_through_checkpoints(decoder: nn.Module) -> Iterator[None]:
    """Let checkpointed layers keep ``past_key_values``: transformers drops it unless the layer says the cache
    is only read, which holds for the replay-safe caches of ``shared_prompt_hidden``."""
    layers = checkpointed_layers(decoder)
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class default
