"""Scoring completions: the final hidden states that predict each completion token, from one pass per row
over [prompt ; completion] or, sharing each prompt among its rows, a prompt prefill whose keys/values are
indexed out to the rows (with the cache layers that keep that replay-safe under gradient checkpointing).

For a mixture-of-experts decoder a pass can also record the router logits of every token it ran (through the
family's ``record_router_logits``), with each token's weight in the load-balancing loss (``RouterTokens``): the
tokens of the rows' full sequences [prompt ; completion] under their masks, as the model's forward over those
sequences counts them; a prompt prefilled once for k rows weighs k."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

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


@dataclass
class RouterTokens:
    """What one scoring pass's decoder calls routed: per layer, the router logits of every token run, (N, E)
    (the calls' rows concatenated), and each token's weight (N,) in the load-balancing loss: its mask value in
    the full sequence [prompt ; completion], times the rows that share it (a shared prompt's tokens)."""

    logits: tuple[Tensor, ...]
    weights: Tensor


# A context factory (the family's ``record_router_logits``): inside, each router's calls append their logits,
# (tokens, E), to that router's list.
RouterRecorder = Callable[[], AbstractContextManager[list[list[Tensor]]]]


def completion_hidden(
    decoder: nn.Module,
    embed: nn.Module,
    prompt_embeds: Tensor,
    prompt_mask: Tensor,
    inverse: Tensor,
    completion: Tensor,
    *,
    sharded: bool = False,
    router_mask: Tensor | None = None,
    record_routers: RouterRecorder | None = None,
    decoder_kwargs: Mapping[str, object] | None = None,
) -> tuple[Tensor, RouterTokens | None]:
    """Final hidden states that predict ``completion`` (n, T), (n, T, D), for rows whose prompts are rows
    ``inverse`` of the U unique ``prompt_embeds`` (U, P, D): each prompt prefilled once where
    ``can_share_prompt`` allows, else one full pass per row. ``decoder_kwargs`` go to every decoder call.

    ``router_mask`` (n, T): the completion tokens that count in the load-balancing loss (TRL: the completion
    mask); given (with ``record_routers``), the second value is the pass's ``RouterTokens``, else None."""
    if (router_mask is None) != (record_routers is None):
        raise ValueError("router_mask and record_routers go together")
    route = dict(router_mask=router_mask, record_routers=record_routers, decoder_kwargs=decoder_kwargs)
    if can_share_prompt(decoder, prompt_embeds.shape[1], completion.shape[1], sharded):
        return shared_prompt_hidden(decoder, embed, prompt_embeds, prompt_mask, inverse, completion, **route)
    return full_sequence_hidden(decoder, embed, prompt_embeds[inverse], prompt_mask[inverse], completion, **route)


def _per_router(recorded: list[list[Tensor]], calls: int) -> tuple[Tensor, ...]:
    """Each router's logits over the pass's ``calls`` decoder calls, concatenated in call order."""
    if not recorded or any(len(logs) != calls for logs in recorded):
        raise RuntimeError(f"expected every router to run once in each of the pass's {calls} decoder calls, got "
                           f"{[len(logs) for logs in recorded]} calls per router")
    return tuple(torch.cat(logs) for logs in recorded)


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
                         completion: Tensor, *, router_mask: Tensor | None = None,
                         record_routers: RouterRecorder | None = None,
                         decoder_kwargs: Mapping[str, object] | None = None) -> tuple[Tensor, RouterTokens | None]:
    """Final hidden states that predict the completion tokens, (n, T, D), from one pass per row over
    [prompt (n, P) ; completion (n, T)] at positions cumsum(mask) - 1; h[:, P-1+t] predicts c[t]. With
    ``router_mask`` also the pass's ``RouterTokens``, weighted by [prompt mask ; router_mask]."""
    embeds = torch.cat([prompt_embeds, embed(completion)], dim=1)
    attention = torch.cat([prompt_mask, torch.ones_like(completion)], dim=1)
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    with record_routers() if record_routers is not None else contextlib.nullcontext([]) as recorded:
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, use_cache=False,
                         **(decoder_kwargs or {})).last_hidden_state
    p, t = prompt_embeds.shape[1], completion.shape[1]
    router = None
    if router_mask is not None:
        weights = torch.cat([prompt_mask, router_mask.to(prompt_mask.device)], dim=1).reshape(-1).float()
        router = RouterTokens(_per_router(recorded, 1), weights)
    return hidden[:, p - 1 : p + t - 1], router


def shared_prompt_hidden(decoder: nn.Module, embed: nn.Module, prompt_embeds: Tensor, prompt_mask: Tensor,
                         inverse: Tensor, completion: Tensor, *, router_mask: Tensor | None = None,
                         record_routers: RouterRecorder | None = None,
                         decoder_kwargs: Mapping[str, object] | None = None) -> tuple[Tensor, RouterTokens | None]:
    """As ``full_sequence_hidden`` for rows ``inverse`` of U unique prompts (U, P), prefilling each once.

        KV_l = decoder(prompt[:, :P-1]) keys/values of layer l, (U, H, P-1, d)  -> KV_l[inverse]
        h    = decoder([prompt[inverse, P-1] ; c[:, :T-1]] | KV) at positions (P-1 .. P+T-2) of
               cumsum([mask ; 1]) - 1, so h[:, t] predicts c[t]

    The indexing is differentiable: in grad mode the prompt's gradients (LoRA, full fine-tuning, a
    trainable tower) sum over the rows that share it, as in the full-sequence pass. Both caches are
    replay-safe, so checkpointed layers may keep them (see ``_RecordingLayer``, ``_ReadOnlyLayer``).

    With ``router_mask`` the second call runs the whole completion c[:, :T] (its last token predicts nothing,
    but the full sequence routes it), and the prefill's tokens weigh the number of rows sharing their prompt:
    the ``RouterTokens`` count every token of the rows' full sequences as often as the full pass does.
    """
    kwargs = dict(decoder_kwargs or {})
    recorded = Cache(layer_class_to_replicate=_RecordingLayer)
    prompt_positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    head = completion if router_mask is not None else completion[:, :-1]
    attention = torch.cat([prompt_mask[inverse], torch.ones_like(head)], dim=1)
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)[:, prompt_embeds.shape[1] - 1 :]
    routing = record_routers() if record_routers is not None else contextlib.nullcontext([])
    with _cache_through_checkpoints(decoder), routing as routed:
        decoder(
            inputs_embeds=prompt_embeds[:, :-1], attention_mask=prompt_mask[:, :-1],
            position_ids=prompt_positions[:, :-1], past_key_values=recorded, use_cache=False, **kwargs,
        )
        past = Cache(layers=[_ReadOnlyLayer(layer.keys[inverse], layer.values[inverse]) for layer in recorded.layers])
        embeds = torch.cat([prompt_embeds[inverse, -1:], embed(head)], dim=1)
        hidden = decoder(
            inputs_embeds=embeds, attention_mask=attention, position_ids=positions, past_key_values=past,
            use_cache=False, **kwargs,
        ).last_hidden_state
    if router_mask is None:
        return hidden, None
    shares = torch.bincount(inverse, minlength=prompt_embeds.shape[0]).to(prompt_mask.device)
    weights = torch.cat([
        (prompt_mask[:, :-1] * shares[:, None]).reshape(-1),  # the prefill's tokens, once per sharing row
        torch.cat([prompt_mask[inverse, -1:], router_mask.to(prompt_mask.device)], dim=1).reshape(-1),
    ]).float()
    return hidden[:, : completion.shape[1]], RouterTokens(_per_router(routed, 2), weights)


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
