"""Sampling completions from the language model on cached prompt embeddings: the decode loop (a lean
``generate`` on a shared prompt prefill, optionally with ``FusedDecodeStep``), Hugging Face ``generate`` as
the alternative, logit warping, the categorical draw and the cross-rank stop check."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from emorl_pl.kernels import exp_shifted_
from emorl_pl.modules.families import AudioLMFamily
from emorl_pl.modules.fused_decode import FusedDecodeStep
from emorl_pl.modules.fused_decode import unsupported as unsupported_for_fusion
from emorl_pl.modules.prompting import PromptEmbeds
from emorl_pl.modules.sharding import gathered

log = logging.getLogger(__name__)
FUSED_DECODE_MODES = ("adapters", "merged", "off")
_STOP_CHECK_EVERY = 8  # decode steps between reads of the "all rows finished" flag (a host sync each)


@dataclass
class Rollout:
    """G completions per prompt; row b*G + g is sample g of utterance b."""

    prompt: PromptEmbeds  # B rows, not repeated
    completion_ids: Tensor  # (B*G, T) right-padded with pad id after EOS
    completion_mask: Tensor  # (B*G, T) 1 up to and including the first EOS
    truncated: Tensor  # (B*G,) bool: no EOS within max_new_tokens
    texts: list[str]  # decoded, special tokens stripped
    group_size: int
    # (B*G, T) log-probs of the sampled tokens under the engine that sampled them (e.g. vLLM), at the
    # sampling temperature; None when the trainer's own decode sampled. GRPOModule then corrects for the
    # engine / trainer mismatch by importance sampling (``emorl_pl.grpo.importance_sampling_correction``).
    sampling_logps: Tensor | None = None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn: greedy (``do_sample=False``) or warped sampling (``warp_logits``).

    ``synced_gpus``: every rank runs the same number of decoder calls (FSDP all-gathers inside them);
    None decides as ``generate`` does: a sharded model and more than one rank.
    """

    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    synced_gpus: bool | None = None


@dataclass(frozen=True)
class SpecialTokens:
    """The ids decoding needs: where rows stop, what fills them after, what is never sampled."""

    eos: list[int]
    pad: int
    suppress: list[int]


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


_CDF_BLOCK = 1024  # categories per block of ``sample_categorical``'s two-level search


def _first_reaching(cdf: Tensor, target: Tensor) -> Tensor:
    """Per row, the first index whose cumulative weight exceeds ``target`` (n, 1); a target at or past the
    row's total (rounding) gives the last index with positive weight, never one of weight zero."""
    passed = torch.searchsorted(cdf, target, right=True)
    last_positive = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)
    return torch.minimum(passed, last_positive).squeeze(1)


def sample_categorical(probs: Tensor, block: int = _CDF_BLOCK) -> Tensor:
    """One index per row of ``probs`` (n, V) (non-negative weights, any scale), drawn in proportion to them
    by inverse CDF with one uniform number per row:

        i = min { i : sum_{j <= i} p_j > u * sum_j p_j },   u ~ U[0, 1)

    in two levels, running sums in float64: the block k of ``block`` categories whose running block total first
    exceeds u * sum, then the index inside block k whose running sum first exceeds what is left of it.
    An exact categorical draw (a zero-weight index is never the first to pass u) where a float64 cumsum over
    all V (27 ms at 24 x 156k on one CPU thread) or ``torch.multinomial`` (per-category work) cost far more.
    """
    n, v = probs.shape
    if v <= block:  # one block: its running sum is the whole search
        cdf = probs.double().cumsum(-1)
        return _first_reaching(cdf, torch.rand(n, 1, dtype=cdf.dtype, device=probs.device) * cdf[:, -1:])
    full = v - v % block
    # block totals summed in the weights' dtype (pairwise: as exact as the weights), accumulated in float64
    sums = [probs[:, :full].view(n, full // block, block).sum(-1)] if full else []
    if full < v:
        sums.append(probs[:, full:].sum(-1, keepdim=True))
    block_cdf = torch.cat(sums, 1).double().cumsum(-1)
    target = torch.rand(n, 1, dtype=torch.float64, device=probs.device) * block_cdf[:, -1:]
    k = _first_reaching(block_cdf, target)
    before = torch.where(k > 0, block_cdf.gather(1, (k - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    columns = k.unsqueeze(1) * block + torch.arange(block, device=probs.device)
    inside = probs.gather(1, columns.clamp(max=v - 1)).double().masked_fill_(columns >= v, 0.0)
    index = _first_reaching(inside.cumsum(-1), (target.squeeze(1) - before).unsqueeze(1))
    return k * block + index


def world_size() -> int:
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


def shared_prefill(hf_model: nn.Module, family: AudioLMFamily, pe: PromptEmbeds, group_size: int):
    """KV cache of the first P-1 prompt tokens, computed for the B prompts once and repeated G times.

    The G samples of one utterance share their prompt, so prefilling B*G identical rows is wasted work;
    ``generate`` then runs only the last prompt token per row (it skips the cached positions).
    Positions are cumsum(mask) - 1 as ``generate`` computes them (pad positions are masked anyway).
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=hf_model.config.get_text_config())
    mask = pe.attention_mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    family.decoder(hf_model)(
        inputs_embeds=pe.inputs_embeds[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
        past_key_values=cache, use_cache=True,
    )
    if group_size > 1:
        cache.batch_repeat_interleave(group_size)
    return cache


def loop_supported(decoder: nn.Module, pe: PromptEmbeds) -> bool:
    """The decode loop needs a prompt of >= 2 tokens (one to prefill, one to feed) and a decoder that takes
    ``past_key_values``; otherwise rollouts fall back to ``generate``."""
    if pe.inputs_embeds.shape[1] < 2:
        return False
    params = inspect.signature(decoder.forward).parameters
    return "past_key_values" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


_fusion_refusals_logged: set[str] = set()


def fusion_allowed(decoder: nn.Module, lm_head: nn.Module, fused_decode: str) -> bool:
    """Whether the loop may run ``FusedDecodeStep``: not "off", Qwen2 layers, plain LoRA or none (an
    FSDP2-sharded model too: ``decode`` gathers its weights for the rollout)."""
    if fused_decode == "off":
        return False
    problem = unsupported_for_fusion(decoder, lm_head)
    if problem is not None and problem not in _fusion_refusals_logged:
        _fusion_refusals_logged.add(problem)  # said once per reason: rollouts then use the decoder's forward
        log.info("fused_decode: not for this model (%s); decoding with the decoder's own forward", problem)
    return problem is None


def decode(hf_model: nn.Module, family: AudioLMFamily, pe: PromptEmbeds, group_size: int, tokens: SpecialTokens,
           settings: SamplingSettings, *, fused_decode: str = "adapters", sharded: bool = False) -> Tensor:
    """``generate`` without its per-token overhead: (B*G, T) new token ids, pad after each row's first EOS.

        KV   = shared prefill of prompt[:, :P-1]  (B rows once, repeated G times)
        h_t  = decoder(x_t | KV) at position cumsum([mask ; 1])-1, x_0 = prompt[:, P-1], x_t = embed(c_{t-1})
        z_t  = lm_head(h_t) in float32, suppressed ids at -inf
        c_t  = argmax z_t (greedy)  or  c_t ~ softmax(top_p(top_k(z_t / temperature)))  (``warp_logits``)

    A finished row emits pad. Whether every row has finished is read every ``_STOP_CHECK_EVERY`` tokens
    only (each read is a host sync); T is then trimmed to the longest completion, as ``generate`` returns.
    With ``synced_gpus`` every rank must run the same number of decoder calls (FSDP all-gathers inside
    them): the stop flag is all-reduced when torch.distributed is up, else all ``max_new_tokens`` run.
    """
    if settings.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {settings.max_new_tokens}")
    if settings.do_sample and not settings.temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {settings.temperature}")
    synced_gpus = settings.synced_gpus
    if synced_gpus is None:
        synced_gpus = sharded and world_size() > 1
    fuse = fusion_allowed(family.decoder(hf_model), hf_model.lm_head, fused_decode)
    merge = fused_decode == "merged"
    if fuse and sharded:
        # Hybrid engine: the weights are gathered once for the whole rollout; the fused step then issues
        # no collective per token, so ranks decode independently and may stop at different lengths.
        with gathered(hf_model):
            return _decode_tokens(hf_model, family, pe, group_size, tokens, settings, synced_gpus=False, fuse=True,
                                  merge=merge)
    return _decode_tokens(hf_model, family, pe, group_size, tokens, settings, synced_gpus=synced_gpus, fuse=fuse,
                          merge=merge)


def _decode_tokens(hf_model: nn.Module, family: AudioLMFamily, pe: PromptEmbeds, group_size: int,
                   tokens: SpecialTokens, settings: SamplingSettings, *, synced_gpus: bool, fuse: bool,
                   merge: bool) -> Tensor:
    """``decode``'s loop (see there), with the fused step or the decoder's forward per token."""
    max_new_tokens, do_sample = settings.max_new_tokens, settings.do_sample
    temperature, top_k, top_p = settings.temperature, settings.top_k, settings.top_p
    decoder, embed, lm_head = family.decoder(hf_model), family.embed(hf_model), hf_model.lm_head
    cache = shared_prefill(hf_model, family, pe, 1 if fuse else group_size)  # the fused step repeats it itself
    prompt_mask = pe.attention_mask.repeat_interleave(group_size, 0)
    n, p = prompt_mask.shape
    device = prompt_mask.device
    attention = torch.cat([prompt_mask, prompt_mask.new_ones(n, max_new_tokens)], dim=1)
    fused = None
    if fuse:
        fused = FusedDecodeStep(decoder, lm_head, [(c.keys, c.values) for c in cache.layers], attention,
                                merge=merge, repeat=group_size)
        del cache
    position = prompt_mask.long().sum(-1, keepdim=True) - 1  # of the last prompt token (left padding)
    x = pe.inputs_embeds[:, -1:].repeat_interleave(group_size, 0)
    eos = torch.tensor(tokens.eos, device=device)
    suppress = torch.tensor(tokens.suppress, dtype=torch.long, device=device)
    ids = torch.full((n, max_new_tokens), tokens.pad, dtype=torch.long, device=device)
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
            z = warp_logits(logits, temperature, top_k, top_p)
            # softmax's numerator: the sampler needs weights in proportion, not a normalised distribution
            exp_shifted_(z)
            token = sample_categorical(z)
        else:
            token = logits.argmax(-1)
        token = token.masked_fill(finished, tokens.pad)
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


def generate(hf_model: nn.Module, family: AudioLMFamily, pe: PromptEmbeds, group_size: int, tokens: SpecialTokens,
             settings: SamplingSettings) -> Tensor:
    """The same completions through Hugging Face ``generate`` on the shared prefill, (B*G, T) new ids."""
    s = settings
    options = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k} if s.do_sample else {}
    if not s.do_sample:  # override sampling defaults from generation_config.json (avoids warnings)
        options = {"temperature": None, "top_p": None, "top_k": None}
    if s.synced_gpus is not None:
        options["synced_gpus"] = s.synced_gpus
    if group_size > 1:
        options["past_key_values"] = shared_prefill(hf_model, family, pe, group_size)
    out = hf_model.generate(
        inputs_embeds=pe.inputs_embeds.repeat_interleave(group_size, 0),
        attention_mask=pe.attention_mask.repeat_interleave(group_size, 0),
        max_new_tokens=s.max_new_tokens,
        do_sample=s.do_sample,
        eos_token_id=tokens.eos,
        pad_token_id=tokens.pad,
        suppress_tokens=tokens.suppress or None,
        use_cache=True,
        **options,
    )
    return out if isinstance(out, Tensor) else out.sequences
