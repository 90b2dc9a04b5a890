"""One decode step of a Qwen2-family language model on a static KV cache (rollouts only).

Per generated token and layer, the Hugging Face forward pays for mask building, cache bookkeeping, output
containers, module calls and peft's wrapper around every LoRA projection. ``FusedDecodeStep`` runs the same
math as plain tensor ops on a preallocated cache, for the token x at position pos written to column c:

    h = x
    for each layer:
        q, k, v = P_q(a), P_k(a), P_v(a)  with a = RMSNorm_1(h);   q, k = rope(q, pos), rope(k, pos)
        K[:, :, c], V[:, :, c] = k, v              (query head j reads KV head j // groups)
        h = h + P_o(softmax(q K[:, :, :c+1]^T * scale + mask) V[:, :, :c+1])
        h = h + P_down(act(P_gate(b)) * P_up(b))   with b = RMSNorm_2(h)
    logits = float32(P_lm(RMSNorm_f(h)))

The G rows of one utterance share their prompt, so the cache holds it once per utterance: per layer and
utterance, K = [prompt (C columns) ; new tokens of its G rows, step-major (column C + t G + g for row g's
t-th token)], and the G x groups query rows of an utterance attend in one SDPA call, a mask keeping each row
to the prompt and its own new tokens. A step reads the prompt's keys/values once per utterance, not G times
(the rollout's largest read after the weights), with as many kernel calls as a per-row cache.

Two ways to apply a projection P(x) = x W^T + bias + sum_a s_a (x A_a^T) B_a^T (a: active LoRA adapters):

- ``merge=False`` ("adapters", the policy's default): the module's own weights and adapters, in peft's
  order of operations. No weight is copied; the logits are the module forward's up to SDPA / kernel
  choice (fp32 tests agree to ~1e-6).
- ``merge=True`` ("merged"): W_eff = W + sum_a s_a B_a A_a once per rollout, with q|k|v and gate|up
  concatenated: one matmul per group instead of up to 3 x 4. Fastest, but holds a copy of every projection
  weight of the language model for the rollout (~13 GB in bf16 for Qwen2-Audio-7B's), and merging
  rounds differently from the module forward (fp32: ~1e-6; bf16: the merged weight is rounded once).

The model's own RMSNorm, rotary and activation modules are called, so epsilon, rope scaling and activation
are the model's. ``unsupported`` names what this step cannot run (another architecture, sliding-window
layers, DoRA or other LoRA variants, sharded or quantised weights); the policy then decodes with the
decoder's own forward.

Families: Qwen2-Audio's Qwen2 layers; the Qwen2.5-Omni thinker's (Qwen2 layers, 3-section multimodal RoPE);
the Qwen3-Omni thinker's (per-head q/k RMSNorm, interleaved multimodal RoPE, mixture-of-experts MLP). A
multimodal rotary module is given the step's position in all three sections, as the thinker's decode gives it
(the text position, offset 0 for audio-and-text prompts: ``families.check_positions``). The experts' routing
depends on each token (top-k of a linear router over all experts), so it is no static tensor program: a
mixture-of-experts MLP runs as the layer's own module (``mlp(x)``: its router, top-k and expert loop), the
rest of the layer fused around it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

# Qwen2-Audio's language model, the Qwen2.5-Omni thinker's (Qwen2 layers), the Qwen3-Omni thinker's (Qwen3-MoE)
_LAYER_CLASSES = ("Qwen2DecoderLayer", "Qwen2_5OmniDecoderLayer", "Qwen3OmniMoeThinkerTextDecoderLayer")
_DENSE_MLP = ("gate_proj", "up_proj", "down_proj")
# Mixture-of-experts MLPs the step calls as modules (their routing is per token: see the module docstring).
_MOE_MLP_CLASSES = ("Qwen3OmniMoeThinkerTextSparseMoeBlock",)


Projection = tuple[Tensor, "Tensor | None", list[tuple[Tensor, Tensor, float]]]  # W, bias, [(A, B, s)]


def _plain_type(module: nn.Module) -> type:
    """The module's own class; FSDP2's ``fully_shard`` swaps it for a generated ``FSDP<Name>`` subclass."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def projection(module: nn.Module) -> Projection:
    """(W, bias, adapters) of an ``nn.Linear`` or a peft LoRA ``Linear``, no copies: ``apply`` computes
    x W^T + bias + sum s (x A^T) B^T as peft's forward does (no adapters when disabled or merged)."""
    if _plain_type(module) is nn.Linear:
        return module.weight, module.bias, []
    base = module.get_base_layer()
    adapters = []
    if not (module.disable_adapters or module.merged):
        adapters = [(module.lora_A[a].weight, module.lora_B[a].weight, module.scaling[a])
                    for a in module.active_adapters if a in module.lora_A]
    return base.weight, base.bias, adapters


def effective_linear(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) that ``module(x)`` applies: W + sum_a s_a B_a A_a over ``projection``'s adapters (a new
    tensor when there are any; the delta in float32, as peft merges, then in W's dtype)."""
    weight, bias, adapters = projection(module)
    for a, b, scale in adapters:
        weight = weight + ((b.float() @ a.float()) * scale).to(weight.dtype)
    return weight, bias


def _cat_biases(qkv: list[tuple[Tensor, Tensor | None]]) -> Tensor | None:
    """The q|k|v bias of merged projections: None when none has one; a missing one adds zeros (Qwen2: all three)."""
    if all(b is None for _, b in qkv):
        return None
    return torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in qkv])


def apply(x: Tensor, proj: Projection) -> Tensor:
    weight, bias, adapters = proj
    y = F.linear(x, weight, bias)
    if adapters:  # as peft: the input in the adapters' dtype (fp32 next to a bf16 base), result cast back
        dtype = y.dtype
        for a, b, scale in adapters:
            y = y + F.linear(F.linear(x.to(a.dtype), a), b) * scale
        y = y.to(dtype)
    return y


def _linear_problem(name: str, module: nn.Module) -> str | None:
    if _plain_type(module) is nn.Linear:
        weight = module.weight
    elif hasattr(module, "get_base_layer") and hasattr(module, "lora_A"):
        if _plain_type(module.get_base_layer()) is not nn.Linear:
            return f"{name}: LoRA on a {_plain_type(module.get_base_layer()).__name__}, not nn.Linear"
        if getattr(module, "lora_variant", None):
            return f"{name}: LoRA variant {sorted(module.lora_variant)} (e.g. DoRA)"
        if any(module.lora_B[a].bias is not None for a in module.active_adapters if a in module.lora_B):
            return f"{name}: LoRA with a bias"
        weight = module.get_base_layer().weight
    else:
        return f"{name}: {type(module).__name__}"
    # An FSDP2 shard (DTensor) is fine: the policy gathers the full weights for the rollout first.
    if type(weight) not in (nn.Parameter, Tensor) and not isinstance(weight, DTensor):
        return f"{name}: weight is a {type(weight).__name__} (quantised?)"
    return None


def unsupported(decoder: nn.Module, lm_head: nn.Module) -> str | None:
    """Why ``FusedDecodeStep`` cannot run this decoder, or None when it can."""
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(decoder, a) for a in ("norm", "rotary_emb", "config")):
        return f"{type(decoder).__name__} has no layers / norm / rotary_emb"
    config = decoder.config
    if getattr(config, "use_sliding_window", False) or any(
        t != "full_attention" for t in (getattr(config, "layer_types", None) or [])
    ):
        return "sliding-window attention layers"
    for i, layer in enumerate(layers):
        if _plain_type(layer).__name__ not in _LAYER_CLASSES:
            return f"layer {i} is a {_plain_type(layer).__name__}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if problem := _linear_problem(f"layers.{i}.self_attn.{name}", getattr(layer.self_attn, name)):
                return problem
        if _is_moe(layer.mlp):
            continue  # called as the layer's own module
        if not all(hasattr(layer.mlp, name) for name in _DENSE_MLP):
            return f"layers.{i}.mlp is a {_plain_type(layer.mlp).__name__}"
        for name in _DENSE_MLP:
            if problem := _linear_problem(f"layers.{i}.mlp.{name}", getattr(layer.mlp, name)):
                return problem
        if any(projection(getattr(layer.mlp, name))[1] is not None for name in ("gate_proj", "up_proj")):
            return f"layers.{i}.mlp: gate/up projections with a bias"
    return _linear_problem("lm_head", lm_head)


def _is_moe(mlp: nn.Module) -> bool:
    return _plain_type(mlp).__name__ in _MOE_MLP_CLASSES


def _rope_sections(rotary: nn.Module) -> int | None:
    """3 for a multimodal rotary module (positions (3, n, L): temporal, height, width), None for a 1-D one."""
    return 3 if hasattr(rotary, "mrope_section") else None


# Where prepacking the lm_head pays on CPU: packing costs about 3 of its GEMMs and saves ~0.25 of one per
# step (fp32, 24 rows x 512 x 156k: 63 -> 46 ms), so from 16 decode steps on; and on heads of 4M+ entries,
# below which oneDNN's per-call overhead (~0.1 ms) outweighs the gain (the d = 64 toy's 1024 x 64 head: +9 ms
# a rollout).
_PACK_MIN_CALLS = 16
_PACK_MIN_ELEMENTS = 1 << 22


def _can_pack(proj: Projection) -> bool:
    """oneDNN's prepacked linear (what torch.compile's CPU freezing uses for fp32 linears) applies to a plain
    fp32 CPU weight; for the few rows of a decode step it runs the lm_head ~1.35x faster than F.linear."""
    weight, _, adapters = proj
    return (not adapters and type(weight) in (nn.Parameter, Tensor) and weight.device.type == "cpu"
            and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available())


class FusedDecodeStep:
    """The decoder + ``lm_head`` as one callable per token, for one rollout (see the module docstring;
    ``merge`` picks how projections are applied).

    ``pack_lm_head``: compute the logits with oneDNN's prepacked linear (a copy of the lm_head weight for the
    rollout; same math, another summation order). None packs where it pays: a plain fp32 CPU lm_head of at
    least ``_PACK_MIN_ELEMENTS`` entries and at least ``_PACK_MIN_CALLS`` decode steps. Never under autocast
    (its dtype would differ).

    ``past`` holds each layer's (keys, values) of the first C prompt columns, (n / repeat, kv_heads, C,
    head_dim): with ``repeat`` = G, row b is the shared prompt of rows b*G .. b*G+G-1, copied once into the
    utterance's cache (see the module docstring), which has room for W - C new tokens per row.
    ``attention`` is the (n, W) 0/1 mask over the columns [prompt ; completion] (left padding 0), W >= C + the
    number of calls. Call k (k = 0, 1, ...) writes column C + k and attends columns 0 .. C + k.
    """

    @torch.no_grad()
    def __init__(self, decoder: nn.Module, lm_head: nn.Module, past: list[tuple[Tensor, Tensor]],
                 attention: Tensor, merge: bool = False, repeat: int = 1, pack_lm_head: bool | None = None) -> None:
        if problem := unsupported(decoder, lm_head):
            raise ValueError(f"FusedDecodeStep cannot run this decoder: {problem}")
        self.rotary, self.norm = decoder.rotary_emb, decoder.norm
        self.rope_sections = _rope_sections(self.rotary)
        attn = decoder.layers[0].self_attn
        self.head_dim, self.scale, self.groups = attn.head_dim, attn.scaling, attn.num_key_value_groups
        n, width = attention.shape
        self.prompt_columns = self.column = c = past[0][0].shape[2]
        self.repeat = g = repeat
        if n % g or past[0][0].shape[0] * g != n:
            raise ValueError(f"past has {past[0][0].shape[0]} rows x repeat {g}, the mask {n}")
        utterances, new = n // g, width - c
        self.width = width
        # "may attend" (B, 1, G x groups, C + new G): query row (g, j) sees its prompt columns and its own
        # new tokens at columns C + t G + g
        allowed = attention.bool().view(utterances, g, width)
        own = torch.eye(g, dtype=torch.bool, device=attention.device)[None, :, None, :] & allowed[..., c:, None]
        rows = torch.cat([allowed[..., :c], own.reshape(utterances, g, new * g)], -1)
        self.mask = rows[:, None, :, None, :].expand(utterances, 1, g, self.groups, c + new * g).reshape(
            utterances, 1, -1, c + new * g)
        self.layers = []
        for layer, (keys, values) in zip(decoder.layers, past):
            a, m = layer.self_attn, layer.mlp
            cache_k = keys.new_empty(utterances, keys.shape[1], c + new * g, keys.shape[3])
            cache_v = torch.empty_like(cache_k)
            cache_k[:, :, :c], cache_v[:, :, :c] = keys, values
            head_norms = {"q_norm": getattr(a, "q_norm", None), "k_norm": getattr(a, "k_norm", None)}
            if _is_moe(m):  # the layer's own mixture-of-experts module, around the fused attention
                qkv = [effective_linear(p) if merge else projection(p) for p in (a.q_proj, a.k_proj, a.v_proj)]
                if merge:
                    attention_in = [(torch.cat([w for w, _ in qkv]), _cat_biases(qkv), [])]
                    o = (*effective_linear(a.o_proj), [])
                else:
                    attention_in, o = qkv, projection(a.o_proj)
                self.layers.append({
                    "norm_1": layer.input_layernorm, "norm_2": layer.post_attention_layernorm, "moe": m,
                    "qkv": attention_in, "split": [p.out_features for p in (a.q_proj, a.k_proj, a.v_proj)],
                    "o": o, "k": cache_k, "v": cache_v, **head_norms,
                })
                continue
            if merge:
                qkv = [effective_linear(p) for p in (a.q_proj, a.k_proj, a.v_proj)]
                qkv_bias = _cat_biases(qkv)
                gate, up = effective_linear(m.gate_proj)[0], effective_linear(m.up_proj)[0]
                attention_in = [(torch.cat([w for w, _ in qkv]), qkv_bias, [])]
                mlp_in = [(torch.cat([gate, up]), None, [])]
                o, down = (*effective_linear(a.o_proj), []), (*effective_linear(m.down_proj), [])
            else:
                attention_in = [projection(p) for p in (a.q_proj, a.k_proj, a.v_proj)]
                mlp_in = [projection(m.gate_proj), projection(m.up_proj)]
                o, down = projection(a.o_proj), projection(m.down_proj)
            self.layers.append({
                "norm_1": layer.input_layernorm, "norm_2": layer.post_attention_layernorm, "act": m.act_fn,
                "qkv": attention_in, "split": [p.out_features for p in (a.q_proj, a.k_proj, a.v_proj)],
                "o": o, "gate_up": mlp_in, "intermediate": m.gate_proj.out_features, "down": down,
                "k": cache_k, "v": cache_v, "moe": None, **head_norms,
            })
        self.lm_head = (*effective_linear(lm_head), []) if merge else projection(lm_head)
        if pack_lm_head is None:
            pack_lm_head = (_can_pack(self.lm_head) and width - self.column >= _PACK_MIN_CALLS
                            and self.lm_head[0].numel() >= _PACK_MIN_ELEMENTS
                            and not torch.is_autocast_enabled(self.lm_head[0].device.type))
        elif pack_lm_head and not _can_pack(self.lm_head):
            raise ValueError("pack_lm_head needs a plain float32 lm_head on CPU without adapters (and oneDNN)")
        self.packed_lm_head = torch.ops.mkldnn._reorder_linear_weight(self.lm_head[0], n) if pack_lm_head else None

    @staticmethod
    def _project(x: Tensor, projections: list[Projection], split: list[int] | int) -> tuple[Tensor, ...]:
        if len(projections) == 1:  # merged: one matmul, then split
            return apply(x, projections[0]).split(split, dim=-1)
        return tuple(apply(x, p) for p in projections)

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = self.head_dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    @torch.no_grad()
    def __call__(self, x: Tensor, position: Tensor) -> Tensor:
        """Logits (n, vocab) in float32 for the next token, given x (n, 1, hidden) at ``position`` (n, 1)."""
        c = self.column
        t = c - self.prompt_columns  # this call's index among the new tokens
        if c >= self.width:
            raise RuntimeError(f"FusedDecodeStep: all {c} cache columns are used")
        n, d, groups, g = x.shape[0], self.head_dim, self.groups, self.repeat
        b, end = n // g, self.prompt_columns + (t + 1) * g  # the utterance's columns in use after this write
        if self.rope_sections is not None:  # the thinker's decode: the position in every section
            position = position[None].expand(self.rope_sections, -1, -1)
        cos, sin = self.rotary(x, position)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (n, 1, 1, d): broadcast over heads
        mask = self.mask[..., :end]
        h = x
        for w in self.layers:
            q, k, v = self._project(w["norm_1"](h), w["qkv"], w["split"])
            if w["q_norm"] is not None:  # Qwen3: RMSNorm over each head's d channels, before the rotation
                q, k = w["q_norm"](q.view(n, -1, d)), w["k_norm"](k.view(n, -1, d))
            # One query token per row: the `groups` query heads sharing a KV head, for the G rows of an
            # utterance, become that head's G x groups query rows, (B, kv_heads, G groups, d); grouped-query
            # attention then needs no copy of K and V.
            q = self._rope(q.view(n, -1, groups, d), cos, sin).view(b, g, -1, groups, d).transpose(1, 2)
            w["k"][:, :, end - g : end] = self._rope(k.view(n, -1, 1, d), cos, sin).view(b, g, -1, d).transpose(1, 2)
            w["v"][:, :, end - g : end] = v.view(b, g, -1, d).transpose(1, 2)
            out = F.scaled_dot_product_attention(q.reshape(b, -1, g * groups, d), w["k"][:, :, :end],
                                                 w["v"][:, :, :end], attn_mask=mask, scale=self.scale)
            out = out.view(b, -1, g, groups, d).transpose(1, 2)  # (B, G, kv_heads, groups, d): row-major again
            h = h + apply(out.reshape(n, 1, -1), w["o"])
            if w["moe"] is not None:
                h = h + w["moe"](w["norm_2"](h))
                continue
            gate, up = self._project(w["norm_2"](h), w["gate_up"], w["intermediate"])
            h = h + apply(w["act"](gate) * up, w["down"])
        self.column = c + 1
        h = self.norm(h)[:, -1]
        if self.packed_lm_head is not None and not torch.is_autocast_enabled(h.device.type):
            _, bias, _ = self.lm_head
            return torch.ops.mkldnn._linear_pointwise(h, self.packed_lm_head, bias, "none", [], "")
        return apply(h, self.lm_head).float()
