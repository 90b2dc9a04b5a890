"""benchmarks/roofline.py against FLOPs and bytes counted by hand for a tiny config, and the roofline's
verdicts at the realistic shape on an H200-like machine."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from emorl_pl.memory_plan import ModelGeometry, audio_params, lm_layer_params, lora_params

# benchmarks/ is not a package: load the module from its file, without putting the folder on sys.path.
_SPEC = importlib.util.spec_from_file_location("roofline", Path(__file__).resolve().parents[1] / "benchmarks/roofline.py")
if "roofline" not in sys.modules:  # registered first: dataclasses resolve annotations through sys.modules
    sys.modules["roofline"] = importlib.util.module_from_spec(_SPEC)
    _SPEC.loader.exec_module(sys.modules["roofline"])
rl = sys.modules["roofline"]

# V = 10, D = 4, L = 1, 2 heads of 2 (kv: 1 head -> kv = 2), I = 8; encoder d = 2, f = 4, 1 layer,
# S = 4 positions (8 mel frames), M = 3 mel bins.
TINY = ModelGeometry(vocab_size=10, hidden_size=4, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=2,
                     intermediate_size=8, audio_d_model=2, audio_layers=1, audio_heads=1, audio_ffn=4,
                     num_mel_bins=3, max_source_positions=4)
# B = 1, G = 2 (n = 2), P = 3, T = 2, A = 2 audio tokens, fp32, LoRA r = 1, beta > 0.
SHAPE = rl.StepShape(batch_size=1, group_size=2, prompt_tokens=3, new_tokens=2, audio_tokens=2, bytes_per_value=4,
                     lora_rank=1, beta=0.04)


def test_parameter_counts_it_builds_on():
    # W = 2 D^2 + 2 D kv + 3 D I = 32 + 16 + 96; Wa = 4 d^2 + 2 d f = 16 + 16
    assert rl.lm_layer_matmul_weights(TINY) == 144
    assert rl.encoder_layer_matmul_weights(TINY) == 32
    # q (16 + 4) + k, v (8 + 2 each) + o 16 + gate, up, down 96 + 2 norms 8
    assert lm_layer_params(TINY) == 160
    # layer + final norm + lm_head (V x D)
    assert rl.lm_weights_read(TINY) == 160 + 4 + 40
    # convs (3*2*3 + 2) + (2*2*3 + 2), positions 4*2, layer 52, final LN 4, projector 2*4 + 4
    assert audio_params(TINY) == 20 + 14 + 8 + 52 + 4 + 12
    # q, o: 1 x (4 + 4); k, v: 1 x (4 + 2); gate, up: 4 + 8; down 8 + 4
    assert lora_params(TINY, 1) == 8 + 6 + 6 + 8 + 12 + 12 + 12


def test_audio_encoder_by_hand():
    w = rl.audio_encoder(TINY, SHAPE)
    conv1 = 2 * 8 * 9 * 2  # 2 x 2S frames x (3 taps x M mels) x d
    conv2 = 2 * 4 * 6 * 2  # 2 x S outputs x (3 taps x d) x d
    layers = 2 * 4 * 32 + 4 * 16 * 2  # 2 S Wa + 4 S^2 d
    projector = 2 * 2 * 2 * 4  # 2 A d D
    assert w.flops == conv1 + conv2 + layers + projector == 800
    # weights 110 x 4 B; fp32 features 3 mels x 8 frames x 4 B; one layer's in/out 2 x 4 x 2 x 4 B
    assert w.bytes == 110 * 4 + 96 + 64 == 600


def test_prefill_by_hand():
    w = rl.prompt_prefill(TINY, SHAPE)
    # P - 1 = 2 tokens: 2 x 2 x 144 matmuls; causal keys 1 + 2 = 3, 4 D L = 16 FLOPs each
    assert w.flops == 2 * 2 * 144 + 16 * 3 == 624
    # layer weights 160, KV written 2 tokens x 2 x kv 2, layers' in/out 2 x 2 tokens x D 4; x 4 B
    assert w.bytes == 4 * (160 + 8 + 16) == 736


def test_decode_by_hand():
    w = rl.decode(TINY, SHAPE)
    # n T = 4 row-tokens through L W + V D = 144 + 40; keys per row P + t = 3, 4: 7, x 2 rows, 16 FLOPs each
    assert w.flops == 2 * 4 * 184 + 16 * 14 == 1696
    # weights 204 per step x 2; keys read: T B (P-1) = 4 shared + n T (T+1)/2 = 6 own, x L 2 kv = 4 values;
    # KV written T n x 4; layers' in/out T x 2 L n D = 32; all x 4 B; then fp32 logits 8 T n V = 320
    assert w.bytes == 4 * (408 + 40 + 16 + 32) + 320 == 2304


def test_policy_and_reference_by_hand():
    # One scoring forward: tokens B (P-1) + n T = 6; linear 2 x 6 x 144 + lm_head 2 x 4 x 40 = 2048;
    # attention 16 x (prompt keys 3 + rows' keys 2 x 7) = 272 (= prefill + decode's FLOPs, 624 + 1696)
    lora = rl.policy_forward_backward(TINY, SHAPE)
    assert lora.flops == 2 * 2048 + 3 * 272 == 4912  # LoRA backward: input gradients only
    assert lora.bytes == 4 * (2 * 204 + 4 * 6 * 4) == 2016
    full = rl.policy_forward_backward(TINY, dataclasses.replace(SHAPE, lora_rank=None))
    assert full.flops == 3 * 2048 + 3 * 272 == 6960  # and the weight gradients
    assert full.bytes == 4 * (3 * 204 + 4 * 6 * 4) == 2832
    ref = rl.reference_forward(TINY, SHAPE)
    assert ref.flops == 2048 + 272 == 2320
    assert ref.bytes == 4 * (204 + 2 * 6 * 4) == 1008
    assert rl.reference_forward(TINY, dataclasses.replace(SHAPE, beta=0.0)) == rl.Work(0, 0)


def test_optimizer_and_step_by_hand():
    assert rl.optimizer(TINY, SHAPE) == rl.Work(0, 28 * 64)
    assert rl.optimizer(TINY, dataclasses.replace(SHAPE, lora_rank=None)) == rl.Work(0, 28 * 204)
    works = rl.step_work(TINY, SHAPE)
    assert tuple(works) == rl.PHASES
    floors = rl.floor_seconds(works, rl.Machine(flops_per_s=100.0, bytes_per_s=1000.0))
    # each phase: max(FLOPs / 100, bytes / 1000); the step: their sum
    assert floors["audio encoder"] == pytest.approx(8.0)  # 800 FLOPs vs 600 B
    assert floors["decode"] == pytest.approx(16.96)
    assert floors["optimizer"] == pytest.approx(1.792)
    assert floors["step"] == pytest.approx(8.0 + 6.24 + 16.96 + 49.12 + 23.2 + 1.792)


def test_logits_bytes():
    assert rl.logits_bytes(24, 64, 156032, 4) == 24 * 64 * 156032 * 4


def test_realistic_shape_on_an_h200_like_machine():
    """At B x G = 24 rows, every decode step reads the 156k x 512 lm_head for 24 tokens: memory-bound;
    the log-prob passes (thousands of tokens per weight read) are compute-bound."""
    g = ModelGeometry(vocab_size=156032, hidden_size=512, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=128,
                      intermediate_size=2048, audio_d_model=256, audio_layers=4, audio_heads=4, audio_ffn=1024)
    s = rl.StepShape(batch_size=4, group_size=6, prompt_tokens=279, new_tokens=64, audio_tokens=100,
                     bytes_per_value=2)
    h200 = rl.Machine(flops_per_s=989e12, bytes_per_s=4.8e12)
    works = rl.step_work(g, s)
    assert rl.bound(works["decode"], h200) == "memory"
    assert rl.bound(works["policy forward+backward"], h200) == "compute"
    assert rl.bound(works["audio encoder"], h200) == "compute"
    # the lm_head alone is most of the decode's bytes (64 steps x 156032 x 512 x 2 B); the layers' weights
    # and the sampler's fp32 logits (8 B x 24 rows x V per step) are most of the rest
    assert 0.65 < 64 * 156032 * 512 * 2 / works["decode"].bytes < 0.75
