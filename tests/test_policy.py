"""AudioLMPolicy on the real-shape Qwen2-Audio (tests/conftest.py): prompt merge, audio-token counts, long
audio, rollout, log-probs vs the model's own forward, audio encoded once, LoRA scoping, reference policy,
full fine-tuning, gradient checkpointing."""

import pytest
import torch
from encoder_calls import count_encoder_calls, encoder_calls_of_a_step
from peft.tuners.lora import LoraLayer
from transformers import Qwen2AudioForConditionalGeneration

import emorl_pl.modules.sampling as sampling_module
from emorl_pl.grpo import completion_mask
from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings, sample_categorical

SR = 16000
G = 3
INSTRUCTION = "What is the emotion of the speaker?"


def _waves(lengths=(8000, 24000, 40000), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(n, generator=g) for n in lengths]


def _perturb_lora(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _reference_logps(model, prompts, rollout, temperature=1.0, positions=True):
    """Independent path: the model's own forward on input_ids + input_features of the full sequence."""
    utt = torch.arange(len(rollout)) // rollout.group_size
    completion = rollout.completion_ids
    ids = torch.cat([prompts.input_ids[utt], completion], 1)
    attention = torch.cat([prompts.attention_mask[utt], torch.ones_like(completion)], 1)
    kwargs = {"position_ids": (attention.cumsum(-1) - 1).clamp(min=0)} if positions else {}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, input_features=prompts.input_features[utt],
                       feature_attention_mask=prompts.feature_attention_mask[utt], **kwargs).logits
    p, t = prompts.input_ids.shape[1], completion.shape[1]
    logp = torch.log_softmax(logits[:, p - 1 : p + t - 1].double() / temperature, -1)
    return logp.gather(-1, completion.unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def lora_policy(real_model_dir):
    policy = AudioLMPolicy(real_model_dir, lora=LoraSettings(r=4, alpha=8)).load()
    _perturb_lora(policy)
    return policy


def test_encode_prompts_matches_model_forward(lora_policy):
    prompts = lora_policy.build_prompts(_waves(), SR, INSTRUCTION, texts=[None, "let me go", None])
    pe = lora_policy.encode_prompts(prompts)
    model = lora_policy.hf_model
    with torch.no_grad():
        full = model(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                     input_features=prompts.input_features,
                     feature_attention_mask=prompts.feature_attention_mask).logits
        ours = model(inputs_embeds=pe.inputs_embeds, attention_mask=pe.attention_mask).logits
    valid = prompts.attention_mask.bool()
    torch.testing.assert_close(ours[valid], full[valid], atol=1e-5, rtol=1e-5)
    assert pe.inputs_embeds.shape == (3, prompts.input_ids.shape[1], 64)


def test_audio_tower_gets_a_key_padding_mask(lora_policy):
    """The tower's layers see padding as a (B, 1, 1, S) additive mask, not an expanded (B, 1, S, S) one."""
    masks = []
    tower = lora_policy.hf_model.model.audio_tower
    handle = tower.layers[0].register_forward_pre_hook(lambda m, args: masks.append(args[1]))
    try:
        lora_policy.encode_prompts(lora_policy.build_prompts(_waves(), SR, INSTRUCTION))
    finally:
        handle.remove()
    (mask,) = masks
    positions = tower.config.max_source_positions
    assert mask.shape == (3, 1, 1, positions) and mask.dtype == torch.float32
    lengths = (torch.tensor([8000, 24000, 40000]) // 160 - 1) // 2 + 1  # 10 ms mel frames, then conv2's stride
    assert ((mask[:, 0, 0] == 0).sum(-1) == lengths).all() and (mask <= 0).all()


def test_build_prompts_pads_left_resamples_and_crops(lora_policy):
    tok = lora_policy.processor.tokenizer
    prompts = lora_policy.build_prompts(_waves((8000, 4000)), 8000, INSTRUCTION, texts=["hello", None])
    # 1 s and 0.5 s at 8 kHz -> 100 and 50 mel frames at 16 kHz
    assert prompts.feature_attention_mask.sum(-1).tolist() == [100, 50]
    assert prompts.attention_mask[1, 0] == 0 and prompts.attention_mask[:, -1].all()  # left padding
    text = tok.decode(prompts.input_ids[0][prompts.attention_mask[0].bool()])
    assert 'Transcript: "hello"\n' + INSTRUCTION in text and text.endswith("<|im_start|>assistant\n")
    assert prompts.seconds_ignored == (0.0, 0.0)
    long = lora_policy.build_prompts(_waves((32 * SR,)), SR, INSTRUCTION)
    assert long.feature_attention_mask.sum().item() == 3000  # cropped to chunk_length = 30 s
    with pytest.raises(ValueError, match=r"waveforms\[1\]"):
        lora_policy.build_prompts([torch.zeros(100), torch.zeros(2, 100)], SR, INSTRUCTION)


def _audio_tokens_for(n_samples: int) -> int:
    """Qwen2-Audio's expansion of one <|AUDIO|>: L = valid mel frames (hop 160, cropped to 30 s), then the
    encoder's stride-2 conv and stride-2 pooling."""
    frames = min(n_samples, 30 * SR) // 160
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def test_build_prompts_holds_one_audio_token_per_encoder_output(lora_policy):
    # build_prompts gives its audio part an "audio" key, which the published template needs (see
    # test_tiny_model); each prompt then holds exactly the expansion of its audio, long audio cropped to 30 s.
    lengths = (8000, 24000, 40000, 31 * SR)
    prompts = lora_policy.build_prompts(_waves(lengths), SR, INSTRUCTION)
    audio_id = lora_policy.processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert audio_id == 151646
    assert (prompts.input_ids == audio_id).sum(-1).tolist() == [_audio_tokens_for(n) for n in lengths] == [12, 37, 62, 750]
    pe = lora_policy.encode_prompts(prompts)
    assert [h.shape[0] for h in pe.audio_hidden] == [12, 37, 62, 750]  # one slot per encoder output


def test_long_audio_is_counted_and_warned_once(real_model_dir, caplog):
    policy = AudioLMPolicy(real_model_dir).load()
    with caplog.at_level("WARNING", logger="emorl_pl.modules.prompting"):
        prompts = policy.build_prompts(_waves((32 * SR, SR)), SR, INSTRUCTION)
        resampled = policy.build_prompts(_waves((33 * 8000,)), 8000, INSTRUCTION)  # 33 s at 8 kHz
    assert prompts.seconds_ignored[0] == pytest.approx(2.0, abs=0.01) and prompts.seconds_ignored[1] == 0.0
    assert resampled.seconds_ignored[0] == pytest.approx(3.0, abs=0.01)
    assert prompts.feature_attention_mask.sum(-1).tolist() == [3000, 100]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "1 of 2 waveforms" in warnings[0].getMessage() and "30 s" in warnings[0].getMessage()
    assert policy.cropped_utterances == 2 and policy.cropped_seconds == pytest.approx(5.0, abs=0.02)
    assert prompts.to("cpu").seconds_ignored == prompts.seconds_ignored


def test_rollout_shapes_groups_and_masks(lora_policy):
    prompts = lora_policy.build_prompts(_waves(), SR, INSTRUCTION)
    torch.manual_seed(0)
    rollout = lora_policy.rollout(prompts, G, max_new_tokens=12, temperature=1.3)
    ids, mask = rollout.completion_ids, rollout.completion_mask
    assert ids.shape[0] == 3 * G and ids.shape[1] <= 12 and mask.shape == ids.shape
    assert len(rollout.texts) == 3 * G and len(rollout.prompt) == 3
    audio_ids = [lora_policy.processor.tokenizer.convert_tokens_to_ids(t)
                 for t in ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")]
    assert not torch.isin(ids, torch.tensor(audio_ids)).any()
    eos = torch.tensor(lora_policy.eos_token_ids)
    for row, m in zip(ids, mask):  # mask is 1 up to and including the first EOS, pad after
        hits = torch.isin(row, eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else len(row)
        assert m.tolist() == [1] * end + [0] * (len(row) - end)
        assert (row[end:] == lora_policy.pad_token_id).all()
    # greedy with G copies: rows b*G..b*G+G-1 all continue prompt b
    greedy = lora_policy.rollout(prompts, G, do_sample=False, max_new_tokens=6)
    grouped = greedy.completion_ids.view(3, G, -1)
    assert (grouped == grouped[:, :1]).all()
    assert lora_policy.greedy(prompts, max_new_tokens=6) == greedy.texts[::G]


def test_audio_special_tokens_are_suppressed(real_model_dir):
    policy = AudioLMPolicy(real_model_dir).load()
    audio_id = policy.processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    prompts = policy.build_prompts(_waves((8000,)), SR, INSTRUCTION)
    pe = policy.encode_prompts(prompts)
    with torch.no_grad():  # make <|AUDIO|> the overwhelming favourite of the raw model after the prompt
        last = policy.hf_model.get_decoder()(inputs_embeds=pe.inputs_embeds).last_hidden_state[0, -1]
        policy.hf_model.lm_head.weight[audio_id] = 50 * last / last.norm()
        raw = policy.hf_model(inputs_embeds=pe.inputs_embeds, attention_mask=pe.attention_mask).logits
    assert raw[0, -1].argmax() == audio_id
    rollout = policy.rollout(pe, 4, max_new_tokens=8)
    assert not (rollout.completion_ids == audio_id).any()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logps_match_full_forward(lora_policy, temperature):
    prompts = lora_policy.build_prompts(_waves(), SR, INSTRUCTION)
    torch.manual_seed(1)
    rollout = lora_policy.rollout(prompts, G, max_new_tokens=10)
    expected = _reference_logps(lora_policy.hf_model, prompts, rollout, temperature)
    got = lora_policy.completion_logps(rollout, temperature=temperature)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    rows = torch.tensor([7, 1, 4])
    torch.testing.assert_close(lora_policy.completion_logps(rollout, rows, temperature=temperature).double(),
                               expected[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora_policy.completion_logps(rollout, slice(2, 5), temperature=temperature).double(),
                               expected[2:5], atol=1e-5, rtol=1e-5)


def test_completion_logps_single_prompt_default_positions(lora_policy):
    # one unpadded prompt: the model's own default positions (arange) need no help from us
    prompts = lora_policy.build_prompts(_waves((16000,)), SR, INSTRUCTION)
    torch.manual_seed(2)
    rollout = lora_policy.rollout(prompts, 2, max_new_tokens=8)
    expected = _reference_logps(lora_policy.hf_model, prompts, rollout, positions=False)
    torch.testing.assert_close(lora_policy.completion_logps(rollout).double(), expected, atol=1e-5, rtol=1e-5)


def test_audio_encoded_once_per_utterance(lora_policy):
    prompts = lora_policy.build_prompts(_waves(), SR, INSTRUCTION)
    encoder = encoder_calls_of_a_step(lora_policy, prompts, G, (slice(0, 4), slice(4, 9)), max_new_tokens=8)
    assert encoder.calls == 1
    assert encoder.utterances == 3


def test_lora_scoped_to_language_model(lora_policy):
    trainable = [n for n, p in lora_policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {id(p) for p in lora_policy.trainable_parameters()} == {
        id(p) for n, p in lora_policy.named_parameters() if p.requires_grad}
    lora_layers = [n for n, m in lora_policy.hf_model.named_modules() if isinstance(m, LoraLayer)]
    assert len(lora_layers) == 2 * 7  # 2 layers x q/k/v/o/gate/up/down
    assert all(".language_model.layers." in n for n in lora_layers)
    assert not any("audio_tower" in n or "projector" in n for n in lora_layers)


def test_reference_equals_fresh_base_model(lora_policy, real_model_dir):
    prompts = lora_policy.build_prompts(_waves(), SR, INSTRUCTION)
    torch.manual_seed(3)
    rollout = lora_policy.rollout(prompts, G, max_new_tokens=10)
    base = Qwen2AudioForConditionalGeneration.from_pretrained(real_model_dir, attn_implementation="sdpa").eval()
    expected = _reference_logps(base, prompts, rollout)
    ref = lora_policy.completion_logps(rollout, reference=True)
    assert not ref.requires_grad
    torch.testing.assert_close(ref.double(), expected, atol=1e-5, rtol=1e-5)
    policy = lora_policy.completion_logps(rollout)
    assert (policy.double() - expected).abs().max() > 1e-2  # the perturbed adapters do change the policy


def test_full_finetune_reference_is_a_hidden_frozen_copy(real_model_dir):
    policy = AudioLMPolicy(real_model_dir, lora=None).load()
    model = policy.hf_model
    assert set(policy.state_dict()) == {f"model.{k}" for k in model.state_dict()}
    trainable = {id(p) for p in policy.trainable_parameters()}
    tower = {id(p) for p in model.model.audio_tower.parameters()}
    assert trainable == {id(p) for p in model.parameters()} - tower
    with policy.reference() as reference:
        ref_params = list(reference.parameters())
    assert not any(id(p) in trainable or p.requires_grad for p in ref_params)
    assert sum(1 for _ in policy.parameters()) == sum(1 for _ in model.parameters())

    prompts = policy.build_prompts(_waves(), SR, INSTRUCTION)
    torch.manual_seed(4)
    rollout = policy.rollout(prompts, 2, max_new_tokens=8)
    before = policy.completion_logps(rollout, reference=True)
    with torch.no_grad():  # a "training step" on every trainable weight
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    after_ref = policy.completion_logps(rollout, reference=True)
    torch.testing.assert_close(after_ref, before, atol=1e-6, rtol=1e-6)
    base = Qwen2AudioForConditionalGeneration.from_pretrained(real_model_dir, attn_implementation="sdpa").eval()
    torch.testing.assert_close(after_ref.double(), _reference_logps(base, prompts, rollout), atol=1e-5, rtol=1e-5)
    moved = policy.completion_logps(rollout)
    torch.testing.assert_close(moved.double(), _reference_logps(model, prompts, rollout), atol=1e-5, rtol=1e-5)
    moved.sum().backward()
    assert model.lm_head.weight.grad is not None and model.model.multi_modal_projector.linear.weight.grad is not None


def test_trainable_audio_tower_gets_gradients(real_model_dir):
    policy = AudioLMPolicy(real_model_dir, lora=None, freeze_audio_tower=False).load()
    prompts = policy.build_prompts(_waves((8000, 16000)), SR, INSTRUCTION)
    with count_encoder_calls(policy) as encoder:
        rollout = policy.rollout(prompts, 2, max_new_tokens=6)
        assert encoder.calls == 1
        logps = policy.completion_logps(rollout, slice(0, 2))  # rows of utterance 0 only
    assert encoder.calls == 2 and encoder.utterances == 3
    logps.sum().backward()
    assert policy.hf_model.model.audio_tower.conv1.weight.grad is not None
    torch.testing.assert_close(
        logps.detach().double(), _reference_logps(policy.hf_model, prompts, rollout)[:2], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_same_logps_and_grads(real_model_dir):
    policies = []
    for checkpointing in (False, True):
        policy = AudioLMPolicy(real_model_dir, lora=LoraSettings(r=4), gradient_checkpointing=checkpointing).load()
        _perturb_lora(policy, seed=5)
        policies.append(policy.train())
    prompts = policies[0].build_prompts(_waves(), SR, INSTRUCTION)
    torch.manual_seed(6)
    rollout = policies[0].rollout(prompts, 2, max_new_tokens=8)
    results = []
    for policy in policies:
        logps = policy.completion_logps(rollout)
        (logps * rollout.completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
        results.append((logps.detach(), grads))
    assert policies[1].hf_model.is_gradient_checkpointing
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-4)


def test_missing_model_dir_is_named(tmp_path):
    missing = tmp_path / "nope"
    # At construction (config time), before any weights are loaded, naming the config key.
    with pytest.raises(FileNotFoundError, match="model_dir=.*nope"):
        AudioLMPolicy(str(missing))
    with pytest.raises(ValueError, match="dtype"):
        AudioLMPolicy(str(tmp_path), dtype="float64")
    # An existing folder that holds no model fails at load, naming it.
    with pytest.raises(FileNotFoundError, match="config.json"):
        AudioLMPolicy(str(tmp_path)).load()


def test_unknown_model_type_is_an_error_even_with_a_model_class(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    # the family (where the audio tower sits) comes from model_type; model_class cannot stand in for it
    with pytest.raises(ValueError, match="model_type 'llama' is not one of .*qwen2_audio.*AudioLMFamily"):
        AudioLMPolicy(str(tmp_path), model_class="transformers.LlamaForCausalLM").load()


def test_missing_model_dir_points_to_the_toy_builder(tmp_path):
    # the quickstart's toy is built by `emorl-toy-model`, never by the policy on the fly
    with pytest.raises(FileNotFoundError, match="emorl-toy-model"):
        AudioLMPolicy(str(tmp_path / "tiny"))
    assert not (tmp_path / "tiny").exists()


def test_shared_prompt_path_equals_full_sequence_forward(real_model_dir):
    # Oracle: the model's own forward on each selected row's whole sequence (input_ids + input_features), with
    # its gradients. float64: the two paths sum the same terms in different orders; a real mismatch shows at 1e-5.
    policy = AudioLMPolicy(real_model_dir, lora=LoraSettings(r=4, alpha=8)).load()
    _perturb_lora(policy, seed=7)
    policy.double()
    prompts = policy.build_prompts(_waves(), SR, INSTRUCTION, texts=[None, "let me go", None])
    prompts.input_features = prompts.input_features.double()
    pads = (prompts.attention_mask == 0).sum(-1)
    assert len(set(pads.tolist())) > 1  # uneven left padding across the utterances
    torch.manual_seed(8)
    rollout = policy.rollout(prompts, G, max_new_tokens=8)
    rows = torch.tensor([7, 1, 4, 0, 2])  # utterances 2, 0, 1, 0, 0: three prompts shared by five rows
    seen = []
    decoder = policy.hf_model.get_decoder()
    hook = decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    mask = rollout.completion_mask[rows]

    def grads():
        out = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
        policy.zero_grad()
        return out

    try:
        policy.zero_grad()
        logps = policy.completion_logps(rollout, rows, temperature=0.8)
        (logps * mask).sum().backward()
        shared_grads, shared_tokens = grads(), sum(b * s for b, s in seen)
        seen.clear()
        utt = rows // rollout.group_size
        completion = rollout.completion_ids[rows]
        ids = torch.cat([prompts.input_ids[utt], completion], 1)
        attention = torch.cat([prompts.attention_mask[utt], torch.ones_like(completion)], 1)
        logits = policy.hf_model(input_ids=ids, attention_mask=attention, input_features=prompts.input_features[utt],
                                 feature_attention_mask=prompts.feature_attention_mask[utt],
                                 position_ids=(attention.cumsum(-1) - 1).clamp(min=0)).logits
        p, t = prompts.input_ids.shape[1], completion.shape[1]
        full = torch.log_softmax(logits[:, p - 1 : p + t - 1] / 0.8, -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        (full * mask).sum().backward()
        full_grads, full_tokens = grads(), sum(b * s for b, s in seen)
    finally:
        hook.remove()
    torch.testing.assert_close(logps.detach(), full.detach(), atol=1e-5, rtol=1e-5)
    assert shared_grads.keys() == full_grads.keys() and len(shared_grads) == 2 * 7 * 2  # lora_A/B x 7 x 2 layers
    for name, grad in full_grads.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-5)
    assert full_tokens == len(rows) * (p + t)
    assert shared_tokens == 3 * (p - 1) + len(rows) * t  # each prompt once, then only the completion per row


# ---------------------------------------------------------------------------- decode loop vs generate
def _decoder_calls(policy):
    """Decoder passes, counted at the final norm: both the decoder's forward and the fused step run it."""
    calls = []
    hook = policy.hf_model.get_decoder().norm.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, hook


@pytest.mark.parametrize("fused", ["adapters", "merged", "off"])
@pytest.mark.parametrize("group_size", [1, G])
def test_decode_loop_greedy_equals_generate(lora_policy, group_size, fused):
    # Oracle: Hugging Face ``generate`` on the same shared prefill (``sampling.generate``, the rollout's own fallback
    # for models the loop cannot drive).
    prompts = lora_policy.build_prompts(_waves(), SR, INSTRUCTION, texts=[None, "let me go", None])
    assert len(set((prompts.attention_mask == 0).sum(-1).tolist())) > 1  # uneven left padding
    pe = lora_policy.encode_prompts(prompts)
    lora_policy.fused_decode = fused
    try:
        loop = lora_policy.rollout(pe, group_size, do_sample=False, max_new_tokens=10)
    finally:
        lora_policy.fused_decode = "adapters"
    tokens = sampling_module.SpecialTokens(lora_policy.eos_token_ids, lora_policy.pad_token_id,
                                           lora_policy.audio_token_ids)
    with torch.no_grad():
        lora_policy.hf_model.eval()
        try:
            ids = sampling_module.generate(lora_policy.hf_model, lora_policy.family, pe, group_size, tokens,
                                           sampling_module.SamplingSettings(max_new_tokens=10, do_sample=False))
        finally:
            lora_policy.hf_model.train()
    finished = completion_mask(ids, lora_policy.eos_token_ids)
    ids = ids.masked_fill(finished == 0, lora_policy.pad_token_id)
    assert torch.equal(loop.completion_ids, ids)
    assert loop.texts == lora_policy.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "fused"), [(1.0, 0, 1.0, "adapters"), (0.7, 5, 1.0, "merged"),
                                                                       (1.3, 0, 0.3, "off"), (0.8, 40, 0.5, "adapters")])
def test_decode_loop_samples_from_hf_warped_distribution(real_model_dir, monkeypatch, temperature, top_k, top_p, fused):
    from transformers.generation.logits_process import (
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    policy = AudioLMPolicy(real_model_dir, fused_decode=fused).load()
    prompts = policy.build_prompts(_waves((8000,)), SR, INSTRUCTION)  # one prompt: no padding
    pe = policy.encode_prompts(prompts)
    with torch.no_grad():
        raw = policy.hf_model(inputs_embeds=pe.inputs_embeds, attention_mask=pe.attention_mask).logits[:, -1]
    # Hugging Face's own processors, in generate's order, as the oracle
    oracle = [SuppressTokensLogitsProcessor(policy.audio_token_ids), TemperatureLogitsWarper(temperature)]
    oracle += [TopKLogitsWarper(top_k)] if top_k else []
    oracle += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    scores = raw.float()
    for processor in oracle:
        scores = processor(pe.input_ids, scores)
    expected = torch.softmax(scores, -1).expand(2, -1)
    seen = []

    def recording_sampler(probs):
        seen.append(probs.clone())
        return probs.argmax(-1)

    monkeypatch.setattr(sampling_module, "sample_categorical", recording_sampler)
    policy.rollout(pe, 2, max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    assert len(seen) == 1
    # the sampler gets weights in proportion to the distribution (it normalises by their sum itself)
    torch.testing.assert_close(seen[0] / seen[0].sum(-1, keepdim=True), expected, atol=1e-6, rtol=1e-5)
    kept = int((expected[0] > 0).sum())
    assert kept < expected.shape[1] - len(policy.audio_token_ids) if (top_k or top_p < 1) else kept > 1
    assert (seen[0][:, policy.audio_token_ids] == 0).all()


def test_build_prompts_under_bf16_autocast(real_model_dir):
    # Lightning's bf16-mixed on CPU runs the training step under this autocast; the processor must not
    policy = AudioLMPolicy(real_model_dir).load()
    plain = policy.build_prompts(_waves(), SR, INSTRUCTION)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prompts = policy.build_prompts(_waves(), SR, INSTRUCTION)
    assert prompts.input_features.dtype == torch.float32
    assert torch.equal(prompts.input_features, plain.input_features)


def test_sample_categorical_draws_each_index_at_its_probability():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0],
                          [0.0, 0.0, 0.0, 0.0, 2.0],  # unnormalised: only ratios matter
                          [1.0, 1.0, 1.0, 1.0, 0.0]])
    n = 40_000
    torch.manual_seed(0)
    draws = sample_categorical(probs.repeat(n, 1)).view(n, 3)
    assert draws.dtype == torch.long
    for row in range(3):
        freq = torch.bincount(draws[:, row], minlength=5).double() / n
        expected = probs[row].double() / probs[row].sum()
        assert (freq[expected == 0] == 0).all()  # a zero-probability index is never drawn
        sigma = (expected * (1 - expected) / n).sqrt()
        assert ((freq - expected).abs() <= 5 * sigma + 1e-12).all(), (row, freq, expected)


def test_sample_categorical_two_level_search_over_blocks():
    """Blocks of 4 over 11 categories (a partial last block), empty blocks, a row whose mass is all in the
    partial block, one tiny weight between zeros: frequencies match p / sum p, zero weights never drawn."""
    probs = torch.tensor([
        [0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.3, 0.0, 0.0, 0.2, 0.4],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 1.0],
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 5.0, 5.0, 0.0, 0.0, 0.0, 1e-3, 0.0, 0.0],
    ])
    n = 60_000
    torch.manual_seed(1)
    draws = sample_categorical(probs.repeat(n, 1), block=4).view(n, 4)
    for row in range(4):
        freq = torch.bincount(draws[:, row], minlength=11).double() / n
        expected = probs[row].double() / probs[row].double().sum()
        assert (freq[expected == 0] == 0).all(), (row, freq)
        sigma = (expected * (1 - expected) / n).sqrt()
        assert ((freq - expected).abs() <= 5 * sigma + 1e-12).all(), (row, freq, expected)
    # one block or the whole row as a block: the same law
    for block in (11, 64):
        torch.manual_seed(2)
        one = sample_categorical(probs.repeat(n, 1), block=block).view(n, 4)[:, 0]
        freq = torch.bincount(one, minlength=11).double() / n
        expected = probs[0].double() / probs[0].sum()
        assert (freq[expected == 0] == 0).all()
        assert ((freq - expected).abs() <= 5 * (expected * (1 - expected) / n).sqrt() + 1e-12).all()


@pytest.mark.parametrize("fused", ["adapters", "off"])
def test_decode_loop_stops_rows_at_eos_and_early_unless_synced(real_model_dir, fused):
    policy = AudioLMPolicy(real_model_dir, fused_decode=fused).load()
    eos, pad = policy.eos_token_ids, policy.pad_token_id
    lm_head = policy.hf_model.lm_head.weight
    pe = policy.encode_prompts(policy.build_prompts(_waves((8000, 24000)), SR, INSTRUCTION))
    with torch.no_grad():  # the prompts' mean final hidden state: the EOS logit grows with the weight on it
        hidden = policy.hf_model.get_decoder()(inputs_embeds=pe.inputs_embeds,
                                               attention_mask=pe.attention_mask).last_hidden_state
        direction = hidden[pe.attention_mask.bool()].mean(0)
        direction /= direction.norm()
        lm_head[eos[0]] += 3 * direction  # EOS likely but not certain among 156k tokens: rows end at different steps
    torch.manual_seed(0)
    ids = policy.rollout(pe, 8, max_new_tokens=16, synced_gpus=False).completion_ids
    hit = torch.isin(ids, torch.tensor(eos))
    ends = [int(h.nonzero()[0]) if h.any() else None for h in hit]
    assert len({e for e in ends if e is not None}) > 1 and None in ends  # mixed: some ended, some truncated
    assert ids.shape == (16, 16)
    for row, end in zip(ids, ends):
        if end is not None:
            assert (row[end + 1 :] == pad).all()  # a finished row emits pad
    with torch.no_grad():
        lm_head[eos[0]] += 50 * direction  # now every row ends at its first token
    for synced, expected_calls in ((False, 1 + 8), (True, 1 + 20)):  # shared prefill + decode steps
        calls, hook = _decoder_calls(policy)
        try:
            rollout = policy.rollout(pe, 3, max_new_tokens=20, synced_gpus=synced)
        finally:
            hook.remove()
        assert len(calls) == expected_calls  # stop checked every 8 tokens; synced ranks run all 20
        assert rollout.completion_ids.tolist() == [[eos[0]]] * 6 and rollout.completion_mask.all()
        assert not rollout.truncated.any()
