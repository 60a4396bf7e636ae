#!/usr/bin/env python3
"""Write a tiny, randomly initialised Hugging Face checkpoint with an offline-built tokenizer.

    python tools/make_tiny_model.py OUT [--moe | --glm4-moe] [--layers 2] [--hidden 64] [--vocab 512] [--seed 0]

Dense: Qwen3ForCausalLM (GQA 4 query / 2 KV heads, q/k-norm, SwiGLU, RoPE, RMSNorm).
--moe: Qwen3MoeForCausalLM, every layer sparse (--experts 8, --top-k 2).
--glm4-moe: Glm4MoeForCausalLM (GLM-4.5 / DeepSeek-V3-style routing): the first --dense-layers
layers have a dense MLP, the others a sigmoid router with a per-expert selection bias
(`e_score_correction_bias`, drawn N(0, --bias-std^2) so that it changes routing), --n-group /
--topk-group group-limited top-k, renormalised top-k weights times --routed-scaling-factor, and
one shared expert; partial RoPE (half of each head), optional q/k-norm and q/k/v bias. No MTP
layer (num_nextn_predict_layers = 0).

Nothing is downloaded. The tokenizer is a byte-level BPE trained here on a synthetic corpus
(words, digits, arithmetic) and padded with reserved specials so len(tokenizer) == vocab_size.
Weights are written in fp32 as model.safetensors in the Hub layout (per-expert tensors for MoE),
then reloaded with transformers and checked. Prints a JSON summary.
"""

import argparse
import json
import os
import random
import sys

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
WORDS = (
    "the a of and to in is it what how many sum plus minus times equals answer question compute "
    "add subtract number result total value please give final boxed reverse copy repeat say hello "
    "world user assistant system yes no true false one two three four five six seven eight nine zero"
).split()


def synthetic_corpus(seed: int, num_lines: int = 4000) -> list[str]:
    """Sentences of words, numbers and arithmetic, so digits and operators become tokens."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"{' '.join(words)} {a} + {b} = {a + b}. \\boxed{{{a + b}}}")
    return lines


def build_tokenizer(vocab_size: int, seed: int):
    """Byte-level BPE with exactly vocab_size entries (specials first, reserved tokens last)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(seed), trainer=trainer)
    have = tok.get_vocab_size(with_added_tokens=True)
    if have > vocab_size:
        raise SystemExit(f"tokenizer needs {have} entries, more than --vocab {vocab_size}; raise --vocab")
    tok.add_special_tokens([AddedToken(f"<|reserved_{i}|>", special=True) for i in range(vocab_size - have)])
    return tok


def build_config(args, ids: dict):
    from transformers import Glm4MoeConfig, Qwen3Config, Qwen3MoeConfig

    num_heads = 4
    common = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=num_heads,
        num_key_value_heads=2,
        head_dim=args.hidden // num_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=args.tie_embeddings,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    if args.glm4_moe:
        common.pop("head_dim")  # Glm4MoeConfig derives it (hidden_size // num_attention_heads)
        common.pop("rope_theta")
        cfg = Glm4MoeConfig(
            **common,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            moe_intermediate_size=args.hidden // 2,
            n_routed_experts=args.experts,
            num_experts_per_tok=args.top_k,
            n_shared_experts=1,
            first_k_dense_replace=args.dense_layers,
            n_group=args.n_group,
            topk_group=args.topk_group,
            norm_topk_prob=True,
            routed_scaling_factor=args.routed_scaling_factor,
            attention_bias=args.attention_bias,
            use_qk_norm=args.qk_norm,
            num_nextn_predict_layers=0,
        )
        cfg.architectures = ["Glm4MoeForCausalLM"]
    elif args.moe:
        cfg = Qwen3MoeConfig(
            **common,
            moe_intermediate_size=args.hidden // 2,
            num_experts=args.experts,
            num_experts_per_tok=args.top_k,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        cfg.architectures = ["Qwen3MoeForCausalLM"]
    else:
        cfg = Qwen3Config(**common)
        cfg.architectures = ["Qwen3ForCausalLM"]
    return cfg


def hub_state_dict(model, cfg) -> dict:
    """The model's weights in the Hub layout: fused in-memory expert tensors split per expert."""
    out = {}
    num_experts = getattr(cfg, "num_experts", None) or getattr(cfg, "n_routed_experts", None)
    for key, t in model.state_dict().items():
        t = t.detach().contiguous()
        if key.endswith(".mlp.experts.gate_up_proj"):  # [E, 2I, H] in transformers 5
            prefix, inter = key[: -len("gate_up_proj")], cfg.moe_intermediate_size
            assert t.shape[0] == num_experts and t.shape[1] == 2 * inter, (key, tuple(t.shape))
            for e in range(num_experts):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].clone()
        elif key.endswith(".mlp.experts.down_proj"):  # [E, H, I]
            prefix = key[: -len("down_proj")]
            for e in range(num_experts):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].clone()
        elif key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        else:
            out[key] = t.clone()
    return out


def init_weights(model, seed: int, std: float) -> None:
    """Deterministic init that does not depend on the transformers version's initialisers."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def init_expert_bias(model, seed: int, std: float) -> None:
    """A non-zero `e_score_correction_bias` per MoE layer (a buffer, so init_weights leaves it)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, b in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * std)


def write_tiny_model(args) -> dict:
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

    os.makedirs(args.out, exist_ok=True)
    raw = build_tokenizer(args.vocab, args.seed)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(args.out)
    ids = {s: raw.token_to_id(s) for s in SPECIALS}

    cfg = build_config(args, ids)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    init_weights(model, args.seed, args.init_std)
    if args.glm4_moe:
        init_expert_bias(model, args.seed, args.bias_std)
    model.config.dtype = torch.float32
    model.config.save_pretrained(args.out)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id).save_pretrained(args.out)
    weights = hub_state_dict(model, cfg)
    save_file(weights, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})

    # Reload offline and check that the checkpoint computes what we built.
    tok2 = AutoTokenizer.from_pretrained(args.out)
    assert len(tok2) == args.vocab and tok2.eos_token_id == ids["<|im_end|>"]
    model2, info = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise SystemExit(f"reloaded checkpoint does not match the model: {problems}")
    x = torch.tensor([tok2("what is 12 + 30 = 42")["input_ids"]])
    with torch.no_grad():
        diff = (model(x).logits - model2.eval()(x).logits).abs().max().item()
    if diff != 0.0:
        raise SystemExit(f"reloaded model computes different logits (max abs diff {diff})")
    return {
        "out": args.out,
        "architecture": cfg.architectures[0],
        "transformers": transformers.__version__,
        "params": sum(t.numel() for t in weights.values()),
        "vocab_size": args.vocab,
        "eos_token_id": cfg.eos_token_id,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output folder")
    family = ap.add_mutually_exclusive_group()
    family.add_argument("--moe", action="store_true", help="Qwen3-MoE instead of dense Qwen3")
    family.add_argument("--glm4-moe", action="store_true", help="GLM-4.5-style MoE (Glm4MoeForCausalLM)")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64, help="multiple of 8 (4 heads)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tie-embeddings", action="store_true")
    glm = ap.add_argument_group("--glm4-moe options")
    glm.add_argument("--dense-layers", type=int, default=1, help="first_k_dense_replace")
    glm.add_argument("--n-group", type=int, default=1)
    glm.add_argument("--topk-group", type=int, default=1)
    glm.add_argument("--routed-scaling-factor", type=float, default=2.5)
    glm.add_argument("--bias-std", type=float, default=0.1, help="std of the random e_score_correction_bias")
    glm.add_argument("--attention-bias", action="store_true", help="q/k/v projections with bias")
    glm.add_argument("--qk-norm", action="store_true", help="use_qk_norm")
    ap.add_argument("--init-std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.hidden % 8 or args.top_k > args.experts:
        ap.error("--hidden must be a multiple of 8 and --top-k <= --experts")
    if args.glm4_moe and (args.experts % args.n_group or not 1 <= args.topk_group <= args.n_group
                          or not 0 <= args.dense_layers < args.layers):
        ap.error("--glm4-moe needs --experts divisible by --n-group, 1 <= --topk-group <= --n-group and "
                 "0 <= --dense-layers < --layers")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    print(json.dumps(write_tiny_model(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
