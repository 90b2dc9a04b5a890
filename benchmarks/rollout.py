"""Rollout time of each decoding path, or of each rollout engine, alternating in one process, as ratios.

    python benchmarks/rollout.py                      # tiny random Qwen2-Audio, LoRA, B=4, G=6, 64 tokens
    python benchmarks/rollout.py --model DIR --dtype bfloat16 --max-new-tokens 256
    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/rollout.py --shape realistic --engine both --threads 1

``--engine paths`` (default): the decoding paths of our own decode against Hugging Face ``generate``:
``generate`` (HF, on the shared prompt prefill), ``off`` (our decode loop, the decoder's forward per token),
``adapters`` (the fused step, the policy's default) and ``merged`` (fused, LoRA merged). Prints median ms per
rollout and the ratio to ``generate``.

``--engine fused|vllm|both``: the policy's rollout engines (``AudioLMPolicy(rollout_engine=...)``), tokens/s
and seconds per rollout, each against the fused decode (the policy's default engine, the baseline). vLLM
needs the vLLM environment (CPU: ``bash scripts/vllm_cpu_env.sh``, then ``.venv-vllm/bin/python``; GPU:
``pip install vllm``), a model in the hub key layout with head_dim >= 32 and the real 30 s window:
``--shape realistic`` (head_dim 128). What is timed is ``policy.rollout(prompt_embeds, G)``, as the trainer
calls it: the audio tower has run for the trainer's own scoring before (not timed, its time printed); the
fused decode reuses that output, vLLM gets the prompt texts and audio and runs its own feature extraction,
audio encoder, prefill and decode. The engine's load (build + first weight sync) and the first rollout of each
engine (warm-up) are timed apart, not in the steady-state numbers; so is one weight sync after an update,
which a GRPO step with vLLM pays once.

Equal work in both modes: each repetition runs every path / engine once on the same prompts (a new batch of
random audio per repetition, so that vLLM's prefix and multimodal caches never hold a previous repetition's
prompt, as in training), same B, G and ``--max-new-tokens``, with EOS suppressed (vLLM: a -100 logit bias, the
engine's own suppression), so all decode ``--max-new-tokens`` tokens; tokens/s counts the tokens actually
generated, for each engine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHAPES, TMP, model_dir_for, print_table, quantiles, sync, synthetic_batch  # noqa: E402

from emorl_pl.modules import sampling  # noqa: E402
from emorl_pl.modules.policy import AudioLMPolicy, LoraSettings  # noqa: E402
from emorl_pl.modules.prompting import PromptEmbeds  # noqa: E402
from emorl_pl.modules.sampling import SamplingSettings, SpecialTokens  # noqa: E402
from emorl_pl.modules.vllm_engine import VLLMSettings  # noqa: E402

PATHS = ("generate", "off", "adapters", "merged")
ENGINES = ("fused", "vllm")
INSTRUCTION = "What is the emotion?"
VLLM_ENV_HINT = ("run it with the vLLM environment's Python: on CPU `bash scripts/vllm_cpu_env.sh`, then "
                 "`VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/rollout.py --shape realistic "
                 "--engine both`; on a GPU machine `pip install vllm` into the environment first")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=("paths", *ENGINES, "both"), default="paths",
                   help="paths: our decoding paths against HF generate (default); fused / vllm / both: the "
                        "policy's rollout engines, tokens/s against the fused decode")
    p.add_argument("--shape", choices=tuple(SHAPES), default="toy",
                   help="toy (1024-token BPE, 2 s window, d=64; head_dim 16: not for vLLM) or realistic (the real "
                        "tokenizer, 156,032-row vocabulary, 30 s window; encoder d=256 x 4, LM d=512 x 4 with 4 "
                        "heads (head_dim 128); 4 s audio)")
    p.add_argument("--model", default=None, help="local Qwen2-Audio dir (default: the shape's model, built once)")
    p.add_argument("--model-root", default=None, help="where the shape's model is built once (default: temp dir)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=None, help="B utterances (default: the shape's, 4)")
    p.add_argument("--group-size", type=int, default=None, help="G completions per utterance (default 6)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 64")
    p.add_argument("--seconds", type=float, default=None, help="audio per utterance (default: the shape's)")
    p.add_argument("--no-lora", action="store_true", help="full fine-tuning: no adapters")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions, after one warm-up round")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of each engine: torch's for the fused decode, vLLM's OpenMP binding "
                        "(VLLM_CPU_OMP_THREADS_BIND, unless set) for vLLM (default: torch's / vLLM's own)")
    p.add_argument("--max-model-len", type=int, default=2048, help="vLLM: longest prompt + completion")
    p.add_argument("--vllm-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="vLLM without graph capture / compilation (default: eager on CPU, vLLM's default on GPU)")
    args = p.parse_args(argv)
    for key in ("batch_size", "group_size", "max_new_tokens", "seconds"):
        if getattr(args, key) is None:
            setattr(args, key, SHAPES[args.shape][key])
    return args


def build_policy(args: argparse.Namespace, device: str) -> AudioLMPolicy:
    model_dir = args.model or model_dir_for(args.shape, Path(args.model_root) if args.model_root else TMP)
    eager = args.vllm_eager if args.vllm_eager is not None else device == "cpu"
    settings = VLLMSettings(dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=eager)
    policy = AudioLMPolicy(model_dir, dtype=args.dtype, lora=None if args.no_lora else LoraSettings(),
                           vllm=settings).load().to(device)
    with torch.no_grad():  # non-zero adapters, as after training has started
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    # Equal work: EOS never sampled, so every completion has max_new_tokens tokens (our decode suppresses
    # these ids; the vLLM engine, built after this, gives them its -100 logit bias).
    policy.audio_token_ids = [*policy.audio_token_ids, *policy.eos_token_ids]
    return policy


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.engine in ("vllm", "both") and importlib.util.find_spec("vllm") is None:
        raise SystemExit(f"rollout.py --engine {args.engine}: vLLM is not installed in this environment "
                         f"({sys.executable}); {VLLM_ENV_HINT}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.engine == "paths":
        return compare_paths(args, device)
    return compare_engines(args, device)


# ------------------------------------------------------------------------------------------ decoding paths
def hf_generate(policy: AudioLMPolicy, pe: PromptEmbeds, group_size: int, max_new_tokens: int) -> torch.Tensor:
    """The baseline: Hugging Face ``generate`` on the same shared prefill, as the rollout draws (``sampling.generate``,
    the rollout's fallback for models the decode loop cannot drive), with the rollout's decoding of the texts."""
    hf = policy.hf_model
    tokens = SpecialTokens(policy.eos_token_ids, policy.pad_token_id, policy.audio_token_ids)
    was_training = hf.training
    hf.eval()
    try:
        policy.family.reset_state(hf)
        ids = sampling.generate(hf, policy.family, pe, group_size, tokens,
                                SamplingSettings(max_new_tokens=max_new_tokens))
    finally:
        hf.train(was_training)
    policy.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
    return ids


def compare_paths(args: argparse.Namespace, device: str) -> dict[str, float]:
    policy = build_policy(args, device)
    batch = synthetic_batch(args.batch_size, args.seconds)
    prompts = policy.build_prompts(batch["waveforms"], batch["sample_rate"], INSTRUCTION).to(device)
    times: dict[str, list[float]] = {path: [] for path in PATHS}
    with torch.no_grad():
        pe = policy.encode_prompts(prompts)
        for rep in range(args.reps + 1):  # the first round warms up
            for path in PATHS:
                policy.fused_decode = path if path in ("adapters", "merged") else "off"
                sync()
                start = time.perf_counter()
                if path == "generate":
                    ids = hf_generate(policy, pe, args.group_size, args.max_new_tokens)
                else:
                    ids = policy.rollout(pe, args.group_size, max_new_tokens=args.max_new_tokens).completion_ids
                sync()
                if rep:
                    times[path].append(time.perf_counter() - start)
                assert ids.shape[1] == args.max_new_tokens
    base = quantiles(times["generate"])["median"]
    print(f"device={device} dtype={args.dtype} B={args.batch_size} G={args.group_size} "
          f"tokens={args.max_new_tokens} lora={not args.no_lora} reps={args.reps} threads={torch.get_num_threads()}")
    rows = []
    for path in PATHS:
        q = quantiles(times[path])
        rows.append([path, 1e3 * q["median"], 1e3 * q["min"], 1e3 * q["max"], q["median"] / base])
    print_table("rollout, median over reps", ["path", "ms", "min ms", "max ms", "/ generate"], rows)
    return {f"{path}_over_generate": quantiles(times[path])["median"] / base for path in PATHS}


# ------------------------------------------------------------------------------------------ rollout engines
def head_dims(model_dir: str) -> tuple[int, int]:
    """(language model, audio encoder) head_dim from ``config.json``."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    text, audio = config["text_config"], config["audio_config"]
    lm = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    return int(lm), int(audio["d_model"] // audio["encoder_attention_heads"])


def bind_vllm_threads(threads: int | None, device: str) -> str:
    """vLLM on CPU binds its worker's OpenMP threads itself (``auto``: all cores but the scheduler's); with
    ``--threads N`` it gets the last N cores of this process's, as many threads as the fused decode."""
    if device == "cpu" and threads and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        cpus = sorted(os.sched_getaffinity(0))[-threads:]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus))
    return os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto" if device == "cpu" else "-")


def children_cpu_seconds() -> float:
    """CPU seconds used so far by this process's children (vLLM's engine core and worker processes)."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def compare_engines(args: argparse.Namespace, device: str) -> dict[str, Any]:
    engines = ENGINES if args.engine == "both" else (args.engine,)
    vllm_bind = bind_vllm_threads(args.threads, device) if "vllm" in engines else "-"
    policy = build_policy(args, device)
    if "vllm" in engines:
        lm_hd, audio_hd = head_dims(policy.model_dir)
        window = policy.processor.feature_extractor.chunk_length
        if lm_hd < 32 or window != 30:  # vLLM's CPU attention; its audio tower is transformers' own
            raise SystemExit(f"rollout.py --engine {args.engine}: vLLM needs a language model head_dim >= 32 and the "
                             f"real 30 s window; {policy.model_dir} has head_dim {lm_hd} (audio {audio_hd}), a "
                             f"{window} s window: use --shape realistic (head_dim 128)")
    batches = [synthetic_batch(args.batch_size, args.seconds, seed=rep) for rep in range(args.reps + 1)]
    times: dict[str, list[float]] = {e: [] for e in engines}
    tokens: dict[str, list[int]] = {e: [] for e in engines}
    first: dict[str, float] = {}
    encode: list[float] = []
    idle_cpu = {"fused": 0.0}  # CPU seconds vLLM's processes used while the fused decode was timed
    load: dict[str, float] = {}
    if "vllm" in engines:
        start = time.perf_counter()
        policy.engine()
        load["vllm engine build"] = time.perf_counter() - start
        start = time.perf_counter()
        policy.sync_engine_weights()  # the LoRA-merged weights, as at the first rollout of a run
        load["first weight sync"] = time.perf_counter() - start
    with torch.no_grad():
        for rep in range(args.reps + 1):  # round 0: each engine's first call (warm-up), not in the numbers
            batch = batches[rep]
            prompts = policy.build_prompts(batch["waveforms"], batch["sample_rate"], INSTRUCTION)
            sync()
            start = time.perf_counter()
            pe = policy.encode_prompts(prompts)  # the trainer's own, for scoring: before either engine
            sync()
            if rep:
                encode.append(time.perf_counter() - start)
            for engine in engines if rep % 2 == 0 else engines[::-1]:  # alternate the order: drift hits both
                policy.rollout_engine = engine
                if engine == "fused" and "vllm" in engines:
                    time.sleep(1.5)  # vLLM's worker spins on its queue for 1 s after a call before it idles
                cpu0 = children_cpu_seconds()
                sync()
                start = time.perf_counter()
                out = policy.rollout(pe, args.group_size, max_new_tokens=args.max_new_tokens)
                sync()
                elapsed = time.perf_counter() - start
                if engine == "fused":
                    idle_cpu["fused"] += children_cpu_seconds() - cpu0
                n_tokens = int(out.completion_mask.sum())
                if rep:
                    times[engine].append(elapsed)
                    tokens[engine].append(n_tokens)
                else:
                    first[engine] = elapsed
                assert out.completion_ids.shape[0] == args.batch_size * args.group_size
        if "vllm" in engines:  # one weight sync after an update (what each GRPO step with vLLM pays once)
            sync_times = []
            for _ in range(2):
                with torch.no_grad():
                    next(p for n, p in policy.named_parameters() if "lora_B" in n or args.no_lora).add_(0.0)
                start = time.perf_counter()
                assert policy.sync_engine_weights()
                sync_times.append(time.perf_counter() - start)
            load["weight sync per update"] = min(sync_times)

    full = args.batch_size * args.group_size * args.max_new_tokens
    print(f"\ndevice={device} dtype={args.dtype} model={policy.model_dir} head_dim(LM, audio)="
          f"{head_dims(policy.model_dir)} B={args.batch_size} G={args.group_size} max_new_tokens="
          f"{args.max_new_tokens} audio={args.seconds:g} s lora={not args.no_lora} reps={args.reps} (+1 warm-up)")
    print(f"threads: fused torch={torch.get_num_threads()}; vLLM VLLM_CPU_OMP_THREADS_BIND={vllm_bind} "
          f"enforce_eager={policy.vllm_settings.enforce_eager} "
          f"VLLM_CPU_KVCACHE_SPACE={os.environ.get('VLLM_CPU_KVCACHE_SPACE', '-')} GiB")
    result: dict[str, Any] = {"device": device, "dtype": args.dtype, "batch_size": args.batch_size,
                              "group_size": args.group_size, "max_new_tokens": args.max_new_tokens}
    base = "fused" if "fused" in engines else None
    rows = []
    for engine in engines:
        q = quantiles(times[engine])
        rate = quantiles([n / t for n, t in zip(tokens[engine], times[engine])])["median"]
        result[f"{engine}_s_per_rollout"] = q["median"]
        result[f"{engine}_tokens_per_s"] = rate
        result[f"{engine}_tokens_per_rollout"] = quantiles(tokens[engine])["median"]
        result[f"{engine}_first_rollout_s"] = first[engine]
        rows.append([engine, q["median"], q["min"], q["max"], f"{min(tokens[engine])}-{max(tokens[engine])}/{full}",
                     rate, first[engine]])
    if base:
        for engine, row in zip(engines, rows):
            row += [result[f"{engine}_tokens_per_s"] / result["fused_tokens_per_s"],
                    result[f"{engine}_s_per_rollout"] / result["fused_s_per_rollout"]]
    header = ["engine", "s/rollout", "min s", "max s", "tokens", "tokens/s", "first s"]
    print_table("rollout engines, median over reps (steady state: load and first call excluded)",
                header + (["tok/s / fused", "s / fused"] if base else []), rows)
    enc = quantiles(encode)["median"]
    print(f"\ntrainer's audio encode + merge (encode_prompts, before the rollout, not timed): {enc:.3f} s; the fused "
          "decode reuses it, vLLM encodes the audio again inside its rollout")
    result["trainer_encode_s"] = enc
    if load:
        print("vLLM, apart from the steady state: " + ", ".join(f"{k} {v:.2f} s" for k, v in load.items()))
        result |= {k.replace(" ", "_") + "_s": v for k, v in load.items()}
    if "vllm" in engines and "fused" in engines:
        result["vllm_cpu_s_during_fused"] = idle_cpu["fused"]
        print(f"vLLM processes' CPU time while the fused decode was timed: {idle_cpu['fused']:.2f} s "
              f"(over {args.reps + 1} fused rollouts; ~0: they were idle)")
        ratio = result["vllm_tokens_per_s"] / result["fused_tokens_per_s"]
        result["vllm_over_fused_tokens_per_s"] = ratio
        # vLLM runs the same Hugging Face audio tower on the same audio: the trainer's time for it estimates
        # the part of vLLM's rollout that the fused decode does not redo.
        net = result["vllm_s_per_rollout"] - enc
        result["vllm_without_audio_encode_s_estimate"] = net
        print(f"\nvLLM / fused tokens/s = {ratio:.3f} (vLLM {result['vllm_tokens_per_s']:.1f} tokens/s, "
              f"{result['vllm_s_per_rollout']:.2f} s/rollout; fused {result['fused_tokens_per_s']:.1f} tokens/s, "
              f"{result['fused_s_per_rollout']:.2f} s/rollout)")
        if net > 0:
            print(f"without its own audio encode (estimate: vLLM s - the trainer's encode s): vLLM {net:.2f} s/rollout, "
                  f"{result['vllm_tokens_per_rollout'] / net:.1f} tokens/s, "
                  f"{result['fused_s_per_rollout'] / net * result['vllm_tokens_per_rollout'] / result['fused_tokens_per_rollout']:.3f} x fused tokens/s")
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
