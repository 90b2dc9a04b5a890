"""FusedDecodeStep against the model's own forward (the oracle): logits per step, with LoRA on and off,
uneven left padding, grouped-query attention (4 heads, 2 KV heads) and the real 156,032-row lm_head (the
real-shape model); and the cases it must refuse, which make the policy decode with the decoder's forward
instead."""

import pytest
import torch
import torch.nn.functional as F
from family_helpers import INSTRUCTION, SR, decode_both, perturb_lora, waves
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from emorl_pl.modules.fused_decode import FusedDecodeStep, effective_linear, unsupported
from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings
from emorl_pl.modules.sampling import shared_prefill


@pytest.fixture(scope="module")
def policy(real_model_dir):
    # perturbed adapters: B = 0 at init would make "merged" trivially equal to the base
    policy = perturb_lora(AudioLMPolicy(real_model_dir, lora=LoraSettings(r=4, alpha=8)).load())
    policy.hf_model.eval()
    return policy


def _prompt_embeds(policy):
    prompts = policy.build_prompts(waves((8000, 24000, 40000)), SR, INSTRUCTION, texts=[None, "let me go", None])
    assert len(set((prompts.attention_mask == 0).sum(-1).tolist())) > 1  # uneven left padding
    return policy.encode_prompts(prompts)


def _decode_both(policy, merge=False, pe=None, pack_lm_head=None):
    """The module forward and FusedDecodeStep on the same 6 random tokens (family_helpers.decode_both)."""
    pe = pe if pe is not None else _prompt_embeds(policy)
    return decode_both(policy, pe, merge, steps=6, pack_lm_head=pack_lm_head)


@pytest.mark.parametrize("merge", [False, True])
def test_fused_step_equals_module_forward_with_lora(policy, merge):
    expected, got = _decode_both(policy, merge)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    # the adapters matter here, so equality above is not the base model's by accident
    with policy.reference():
        base, base_fused = _decode_both(policy, merge)
    assert (base - expected).abs().max() > 1e-2
    torch.testing.assert_close(base_fused, base, atol=2e-5, rtol=1e-5)  # adapters off: base weights only


def test_fused_step_in_bf16_and_under_autocast(policy, tmp_path):
    # bf16 weights with fp32 adapters (peft's default), then fp32 weights under bf16 autocast (Lightning's
    # bf16-mixed): the adapter mode computes what peft computes, in the same dtypes
    bf16 = AudioLMPolicy(policy.model_dir, dtype="bfloat16", lora=LoraSettings(r=4, alpha=8)).load()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in bf16.named_parameters():
            if "lora_" in name:
                assert p.dtype == torch.float32
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    bf16.hf_model.eval()
    expected, got = _decode_both(bf16)
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=0)  # ~1 bf16 ulp of logits of size ~0.7
    expected_m, got_m = _decode_both(bf16, merge=True)
    torch.testing.assert_close(got_m, expected_m, atol=0.03, rtol=0)  # merged weights are rounded to bf16
    pe = _prompt_embeds(policy)  # outside autocast: the feature extractor must stay in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = _decode_both(policy, pe=pe)
    # Both round the attention's operands to bf16 but sum in other orders, so they are not bit-equal: the
    # fused step must be as close to the fp32 logits as the module's own autocast forward is.
    exact, _ = _decode_both(policy, pe=pe)
    err_module, err_fused = (expected - exact).abs(), (got - exact).abs()
    assert err_fused.mean() <= 1.1 * err_module.mean() and err_fused.max() <= 1.5 * err_module.max()
    torch.testing.assert_close(got, expected, atol=0.15, rtol=0)


def test_fused_step_keeps_the_prompt_cache_once_per_utterance(policy):
    hf = policy.hf_model
    pe = _prompt_embeds(policy)
    with torch.no_grad():
        shared = shared_prefill(hf, policy.family, pe, 1)
    past = [(c.keys, c.values) for c in shared.layers]
    mask = pe.attention_mask.repeat_interleave(4, 0)
    step = FusedDecodeStep(hf.get_decoder(), hf.lm_head, past, torch.cat([mask, mask.new_ones(12, 5)], 1), repeat=4)
    for layer, (keys, values) in zip(step.layers, past):
        # per utterance: its C prompt columns, then W - C = 6 new columns for each of its 4 rows
        assert layer["k"].shape == (3, keys.shape[1], keys.shape[2] + 4 * 6, keys.shape[3])
        assert torch.equal(layer["k"][:, :, : keys.shape[2]], keys)
        assert torch.equal(layer["v"][:, :, : keys.shape[2]], values)


def _one_column_past(decoder):
    """Per layer (keys, values) of one prompt row and one cached column, zeros."""
    kv, d = decoder.config.num_key_value_heads, decoder.layers[0].self_attn.head_dim
    return [(torch.zeros(1, kv, 1, d),) * 2 for _ in decoder.layers]


@pytest.mark.parametrize("merge", [False, True])
def test_fused_step_with_the_prepacked_lm_head(policy, merge):
    """oneDNN's prepacked lm_head linear (fp32 CPU) gives the module forward's logits, the 156,032-row head."""
    expected, got = _decode_both(policy, merge, pack_lm_head=True)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_fused_step_packs_the_lm_head_only_where_it_pays(policy):
    hf = policy.hf_model
    decoder = hf.get_decoder()
    past = _one_column_past(decoder)
    assert FusedDecodeStep(decoder, hf.lm_head, past, torch.ones(1, 1 + 16)).packed_lm_head is not None
    assert FusedDecodeStep(decoder, hf.lm_head, past, torch.ones(1, 1 + 15)).packed_lm_head is None  # short
    lm = _tiny_lm()  # a 64-row head: oneDNN's per-call overhead would outweigh the gain
    tiny_past = [(torch.zeros(1, 2, 1, 8),) * 2 for _ in lm.model.layers]
    assert FusedDecodeStep(lm.model, lm.lm_head, tiny_past, torch.ones(1, 40)).packed_lm_head is None
    lm = _tiny_lm().to(torch.bfloat16)
    short_past = [(torch.zeros(1, 2, 1, 8, dtype=torch.bfloat16),) * 2 for _ in lm.model.layers]
    assert FusedDecodeStep(lm.model, lm.lm_head, short_past, torch.ones(1, 40)).packed_lm_head is None  # bf16
    with pytest.raises(ValueError, match="pack_lm_head needs a plain float32"):
        FusedDecodeStep(lm.model, lm.lm_head, short_past, torch.ones(1, 40), pack_lm_head=True)
    # with a bias, against F.linear
    lm = _tiny_lm()
    lm.lm_head = torch.nn.Linear(32, 64, bias=True)
    x, past = torch.randn(3, 1, 32), [(torch.randn(3, 2, 2, 8),) * 2 for _ in lm.model.layers]
    with torch.no_grad():
        plain = FusedDecodeStep(lm.model, lm.lm_head, past, torch.ones(3, 4), pack_lm_head=False)(x, torch.full((3, 1), 2))
        packed = FusedDecodeStep(lm.model, lm.lm_head, past, torch.ones(3, 4), pack_lm_head=True)(x, torch.full((3, 1), 2))
    torch.testing.assert_close(packed, plain, atol=1e-6, rtol=1e-6)


def test_adapter_mode_copies_no_weight_and_merged_mode_does(policy):
    hf = policy.hf_model
    decoder = hf.get_decoder()
    past = _one_column_past(decoder)
    own = {p.data_ptr() for p in decoder.parameters()} | {hf.lm_head.weight.data_ptr()}

    def weights(step):
        return [w for layer in step.layers for key in ("qkv", "gate_up", "o", "down")
                for proj in (layer[key] if isinstance(layer[key], list) else [layer[key]])
                for w in [proj[0], *(t for a, b, _ in proj[2] for t in (a, b))]]

    adapters = FusedDecodeStep(decoder, hf.lm_head, past, torch.ones(1, 2))
    assert len(weights(adapters)) == 2 * 7 * 3  # 7 projections per layer, each W + LoRA A, B
    assert all(w.data_ptr() in own for w in weights(adapters))
    merged = FusedDecodeStep(decoder, hf.lm_head, past, torch.ones(1, 2), merge=True)
    assert len(weights(merged)) == 2 * 4 and not any(w.data_ptr() in own for w in weights(merged))


def test_effective_linear_is_what_the_module_applies(policy):
    q = policy.hf_model.get_decoder().layers[1].self_attn.q_proj
    x = torch.randn(5, q.in_features)
    weight, bias = effective_linear(q)
    with torch.no_grad():
        torch.testing.assert_close(F.linear(x, weight, bias), q(x), atol=1e-5, rtol=1e-5)
        base = q.get_base_layer()
        delta = (q.lora_B["default"].weight @ q.lora_A["default"].weight) * q.scaling["default"]  # W + s B A
        torch.testing.assert_close(weight, base.weight + delta)


def test_fused_step_refuses_past_its_cache(policy):
    hf = policy.hf_model
    decoder = hf.get_decoder()
    kv = decoder.config.num_key_value_heads
    past = [(torch.zeros(1, kv, 2, decoder.layers[0].self_attn.head_dim),) * 2 for _ in decoder.layers]
    step = FusedDecodeStep(decoder, hf.lm_head, past, torch.ones(1, 3))
    x, pos = torch.zeros(1, 1, decoder.config.hidden_size), torch.tensor([[2]])
    step(x, pos)
    with pytest.raises(RuntimeError, match="all 3 cache columns"):
        step(x, pos + 1)


def _tiny_lm(**overrides):
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, **overrides)
    return Qwen2ForCausalLM(config)


def test_unsupported_names_the_reason():
    lm = _tiny_lm()
    assert unsupported(lm.model, lm.lm_head) is None
    lm = _tiny_lm(use_sliding_window=True, sliding_window=8, max_window_layers=0)
    assert "sliding" in unsupported(lm.model, lm.lm_head)
    dora = get_peft_model(_tiny_lm(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    inner = dora.base_model.model
    assert "variant" in unsupported(inner.model, inner.lm_head) and "q_proj" in unsupported(inner.model, inner.lm_head)
    with pytest.raises(ValueError, match="cannot run this decoder: .*variant"):
        FusedDecodeStep(inner.model, inner.lm_head, [], torch.ones(1, 2))


@pytest.mark.parametrize("mode", ["adapters", "merged", "off"])
def test_rollout_uses_fusion_only_when_allowed(policy, mode, monkeypatch):
    calls = []
    original = FusedDecodeStep.__call__
    monkeypatch.setattr(FusedDecodeStep, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    policy.fused_decode = mode
    try:
        rollout = policy.rollout(_prompt_embeds(policy), 2, do_sample=False, max_new_tokens=4)
    finally:
        policy.fused_decode = "adapters"
    assert len(calls) == (0 if mode == "off" else rollout.completion_ids.shape[1])


def test_policy_rejects_an_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="fused_decode must be one of .*'merge'"):
        AudioLMPolicy(str(tmp_path), fused_decode="merge")
