"""Kernels behind the GRPO math: per-token log-probs of sampled tokens without the (N, T, V) log-softmax.

``token_logprobs`` (from logits) and ``linear_token_logprobs`` (from hidden states, the ``lm_head``
projection chunked in) with their hand-written autograd, and ``exp_shifted_``, the in-place shifted exp
that both they and the sampler (``emorl_pl.modules.sampling``) use. Pure torch; ``emorl_pl.grpo`` holds
the GRPO formulas and re-exports the public names.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EXP_BLOCK_BYTES = 3 << 19  # rows per block of exp_shifted_: up to 1.5 MB (2 rows of 156k fp32), inside a core's L2


def exp_shifted_(z: Tensor) -> tuple[Tensor, Tensor]:
    """In place, per row of the last dimension: z <- exp(z - m), m = max z; returns (m, sum exp(z - m)),
    each with a trailing 1, so logsumexp(z) = m + log(sum) and softmax(z) = z_new / sum.

    A few rows at a time: the max, the shift and exp, and the sum then reread the rows from cache, where
    whole-tensor passes reread the tensor from memory each time (on CPU ~2x the time at 256 x 156k).
    """
    flat = z.view(-1, z.shape[-1])
    peak = torch.empty(flat.shape[0], 1, dtype=z.dtype, device=z.device)
    total = torch.empty_like(peak)
    # on GPU one pass is best; on CPU small tensors too (each block costs three op launches)
    step = max(1, _EXP_BLOCK_BYTES // (flat.shape[1] * flat.element_size())) if z.device.type == "cpu" else flat.shape[0]
    for start in range(0, flat.shape[0], step):
        block = flat[start : start + step]
        torch.amax(block, -1, keepdim=True, out=peak[start : start + step])
        torch.sum(block.sub_(peak[start : start + step]).exp_(), -1, keepdim=True, out=total[start : start + step])
    shape = (*z.shape[:-1], 1)
    return peak.view(shape), total.view(shape)


def _softmax_(z: Tensor) -> Tensor:
    """softmax over the last dimension, in place on CPU (the same kernel and bits as ``torch.softmax``, without a
    chunk-sized new tensor and its page faults); a new tensor elsewhere."""
    if z.device.type == "cpu":
        return torch.ops.aten._softmax.out(z, -1, False, out=z)
    return torch.softmax(z, dim=-1)


def _selected_logprob_grad_(z: Tensor, idx: Tensor, grad_out: Tensor, tau: float) -> Tensor:
    """d/dz of sum grad_out * log softmax(z / tau)[idx] = (onehot(idx) - softmax(z / tau)) * grad_out / tau,
    overwriting ``z`` (logits the caller may overwrite)."""
    if tau != 1.0:
        z = z.div_(tau)
    g_out = grad_out.unsqueeze(-1)
    g = _softmax_(z).mul_(-g_out)
    g.scatter_add_(-1, idx, g_out)
    return g.div_(tau) if tau != 1.0 else g


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(x / tau)[token], chunked over rows in forward and (recomputed) in backward.

    Forward saves only the logits reference (already alive in the graph), never a (N, T, V) softmax.
    d/dx_v [x_k / tau - logsumexp(x / tau)] = (1[v == k] - softmax(x / tau)_v) / tau.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float, chunk_size: int) -> Tensor:
        out = torch.empty(
            tokens.shape,
            dtype=torch.float32 if logits.dtype != torch.float64 else logits.dtype,
            device=logits.device,
        )
        idx = tokens.unsqueeze(-1)
        for start in range(0, logits.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            # Upcast per chunk: bf16 logsumexp over a 150k vocabulary loses ~2 significant digits.
            x = logits[rows].to(out.dtype)
            if temperature != 1.0:
                x = x / temperature
            out[rows] = x.gather(-1, idx[rows]).squeeze(-1) - torch.logsumexp(x, dim=-1)
        ctx.save_for_backward(logits, tokens)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, tokens = ctx.saved_tensors
        tau, chunk_size = ctx.temperature, ctx.chunk_size
        grad = torch.empty_like(logits)
        idx = tokens.unsqueeze(-1)
        for start in range(0, logits.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            # a copy of the chunk (the saved logits stay as they are) becomes its gradient in place
            z = logits[rows].to(grad_out.dtype, copy=True)
            grad[rows] = _selected_logprob_grad_(z, idx[rows], grad_out[rows], tau)
        return grad, None, None, None


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int = 1) -> Tensor:
    """Log-probability of each sampled token, (N, T, V), (N, T) -> (N, T).

        logp[n, t] = z[n, t, tokens[n, t]] - logsumexp_v z[n, t, v],   z = logits / temperature

    ``logits[:, t]`` must predict ``tokens[:, t]`` (shift the model output by one before calling).
    Dividing by the sampling temperature scores tokens under the distribution they were sampled
    from (as TRL). Computed ``chunk_size`` sequences at a time, in float32 for float32/bf16/fp16
    inputs, so no full (N, T, V) log-softmax copy exists in forward or backward; the result is
    float32 (float64 for float64 logits) and differentiable w.r.t. ``logits``.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (N, T, V), got shape {tuple(logits.shape)}")
    if tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"tokens must be (N, T) = {tuple(logits.shape[:2])} to match logits, got {tuple(tokens.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _SelectiveLogSoftmax.apply(logits, tokens.long(), float(temperature), int(chunk_size))


def _project_chunk(h: Tensor, weight: Tensor, bias: Tensor | None, buffer: Tensor | None) -> Tensor:
    """h W^T + b for one chunk of positions (c, D) -> (c, V), written into ``buffer[:c]`` when one is given."""
    if buffer is None:
        return torch.nn.functional.linear(h, weight, bias)
    out = buffer[: h.shape[0]]
    return torch.mm(h, weight.t(), out=out) if bias is None else torch.addmm(bias, h, weight.t(), out=out)


def _reusable(z: Tensor, dtype: torch.dtype) -> Tensor | None:
    """The first chunk's logits as the buffer later chunks write into, where that is possible: a fresh
    chunk-sized tensor per chunk costs its page faults on CPU (~80 ms per 160 MB, a quarter of the chunk's
    GEMM). Not when a cast follows (the chunk is then a copy anyway) nor under autocast (no out= form)."""
    return z if z.dtype == dtype and not torch.is_autocast_enabled(z.device.type) else None


class _LinearLogSoftmax(torch.autograd.Function):
    """log softmax((h W^T + b) / tau)[token], never holding more than ``chunk_size`` rows of logits.

    With p = softmax(z / tau), z = h W^T + b, and y the token:
        d logp / dz = (onehot(y) - p) / tau                      (per row and position)
        d logp / dh = (W_y - p W) / tau =: J                     (a D-vector per position)
    Two ways to get the gradient, chosen by ``grad_in_forward``:
    - True (only h needs a gradient: a frozen lm_head, as with LoRA): forward also computes J per chunk, while
      the chunk's logits exist, and keeps it, (N, T, D); backward is dh = grad_out * J. Two lm_head GEMMs
      per chunk (z and p W) instead of three (z, then z again and g W in backward).
    - False: forward keeps only h, W, b and the tokens; backward recomputes each chunk's logits:
        g_z = (onehot(y) - p) * grad_out / tau                  (chunk, T, V)
        dh  = g_z W,   dW += g_z^T h,   db += sum g_z
    The logits are computed in the dtype the forward's matmul used (autocast's, if on) and reduced in fp32.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor, temperature: float,
                chunk_size: int, grad_in_forward: bool) -> Tensor:
        # float32 (float64 for float64 inputs), as token_logprobs
        out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        out = torch.empty(tokens.shape, dtype=out_dtype, device=hidden.device)
        jac = torch.empty(hidden.shape, dtype=out_dtype, device=hidden.device) if grad_in_forward else None
        flat_h, flat_y, flat_out = hidden.flatten(0, 1), tokens.reshape(-1, 1), out.view(-1)
        flat_jac = None if jac is None else jac.view(-1, hidden.shape[-1])
        step = chunk_size * hidden.shape[1]  # positions per chunk
        compute_dtype, w, buffer = None, None, None
        for start in range(0, flat_h.shape[0], step):
            rows = slice(start, start + step)
            z = _project_chunk(flat_h[rows], weight, bias, buffer)
            if buffer is None:
                compute_dtype, buffer = z.dtype, _reusable(z, out_dtype)
            z = z.to(out_dtype)  # z is ours (a new tensor or the buffer): changed in place from here on
            if temperature != 1.0:
                z = z.div_(temperature)
            # logsumexp in place (torch.logsumexp allocates a second chunk-sized tensor for z - max):
            # one exp pass serves the log-probs and, with a gradient to form, the softmax
            z_y = z.gather(-1, flat_y[rows]).squeeze(-1)
            peak, total = exp_shifted_(z)
            e = z
            flat_out[rows] = z_y - peak.squeeze(-1) - total.squeeze(-1).log()
            if flat_jac is None:
                continue
            if w is None:
                w = weight.to(compute_dtype)  # once (a copy only under autocast)
            # p W = (e W) / total: the division on (chunk, D), not on the (chunk, V) weights
            j = w[flat_y[rows, 0]].to(out_dtype) - (e.to(compute_dtype) @ w).to(out_dtype) / total
            flat_jac[rows] = j / temperature if temperature != 1.0 else j
        if jac is not None:
            ctx.save_for_backward(jac)
        else:
            ctx.save_for_backward(hidden, weight, bias, tokens)
        ctx.grad_in_forward, ctx.hidden_dtype = grad_in_forward, hidden.dtype
        ctx.temperature, ctx.chunk_size, ctx.compute_dtype = temperature, chunk_size, compute_dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        if ctx.grad_in_forward:
            (jac,) = ctx.saved_tensors
            return (grad_out.unsqueeze(-1) * jac).to(ctx.hidden_dtype), None, None, None, None, None, None
        hidden, weight, bias, tokens = ctx.saved_tensors
        tau, dtype = ctx.temperature, ctx.compute_dtype
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        flat_h, flat_y = hidden.flatten(0, 1), tokens.reshape(-1, 1)
        flat_grad_h = None if grad_h is None else grad_h.view(-1, hidden.shape[-1])
        flat_grad_out = grad_out.reshape(-1)
        step, buffer = ctx.chunk_size * hidden.shape[1], None
        for start in range(0, flat_h.shape[0], step):
            rows = slice(start, start + step)
            h = flat_h[rows].to(dtype)
            z = _project_chunk(h, w, b, buffer)
            if buffer is None:
                buffer = _reusable(z, grad_out.dtype)
            # z is ours (the reused buffer, or a cast copy): the gradient overwrites it
            g = _selected_logprob_grad_(z.to(grad_out.dtype), flat_y[rows], flat_grad_out[rows], tau).to(dtype)
            if need_h:
                flat_grad_h[rows] = (g @ w).to(hidden.dtype)
            if need_w:
                grad_w += (g.T @ h).to(acc)
            if need_b:
                grad_b += g.to(acc).sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


# Tokens per lm_head chunk in ``linear_token_logprobs``' callers: big enough for an efficient GEMM (64-token
# chunks ran the projection at half the speed on CPU), small enough to bound memory (x V x 4 B, 160 MB at V=156k).
LOGITS_CHUNK_TOKENS = 256


def linear_token_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor,
                          temperature: float = 1.0, chunk_size: int = 1) -> Tensor:
    """``token_logprobs(linear(hidden, weight, bias), tokens)`` without the (N, T, V) logits: the output
    projection (``lm_head``) runs ``chunk_size`` sequences at a time, so at most (chunk_size, T, V) logits
    exist at once. (N, T, D) hidden, (V, D) weight -> (N, T) float32 (float64 for float64 inputs);
    differentiable w.r.t. hidden, weight and bias. With a frozen ``weight`` and ``bias`` and grad enabled,
    the gradient w.r.t. ``hidden`` is formed in the forward, chunk by chunk (an (N, T, D) tensor kept for
    backward); otherwise backward recomputes each chunk's logits (see ``_LinearLogSoftmax``)."""
    if hidden.dim() != 3 or tokens.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be (N, T, D) and tokens (N, T); got {tuple(hidden.shape)}, {tuple(tokens.shape)}")
    if temperature <= 0 or chunk_size < 1:
        raise ValueError(f"temperature must be > 0 and chunk_size >= 1, got {temperature}, {chunk_size}")
    # A frozen lm_head (LoRA): the gradient w.r.t. hidden is cheapest to form while the logits exist.
    frozen_head = not weight.requires_grad and (bias is None or not bias.requires_grad)
    grad_in_forward = torch.is_grad_enabled() and hidden.requires_grad and frozen_head
    return _LinearLogSoftmax.apply(hidden, weight, bias, tokens.long(), float(temperature), int(chunk_size),
                                   grad_in_forward)
