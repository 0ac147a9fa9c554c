"""Tiny random models of every supported architecture, with a local word-level tokenizer."""

from __future__ import annotations

import functools

import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VOCAB = 100
WORDS = ["<pad>", "<unk>", "<bos>"] + [f"w{i}" for i in range(VOCAB - 3)]
MAX_PARAMS = 60_000

_COMMON = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, vocab_size=VOCAB,
               max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=2)

CONFIGS = {
    "gpt2": lambda: T.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=64,
                                 pad_token_id=0, bos_token_id=2, eos_token_id=2),
    "gpt_neox": lambda: T.GPTNeoXConfig(num_attention_heads=4, **_COMMON),
    "llama": lambda: T.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **_COMMON),
    "mistral": lambda: T.MistralConfig(num_attention_heads=4, num_key_value_heads=2, **_COMMON),
    "qwen2": lambda: T.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **_COMMON),
    "gemma": lambda: T.GemmaConfig(num_attention_heads=4, num_key_value_heads=1, head_dim=8, **_COMMON),
    "gemma2": lambda: T.Gemma2Config(num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     final_logit_softcapping=5.0, **_COMMON),
    # famA (issue 14): QK-norm, mixture-of-experts (4 experts, top-2), post-sub-layer norms, sinks.
    "qwen3": lambda: T.Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=8, **_COMMON),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                                          num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                                          **_COMMON),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(num_attention_heads=4, num_key_value_heads=2, num_experts=4,  # + shared
                                          num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                                          shared_expert_intermediate_size=16, **_COMMON),
    "mixtral": lambda: T.MixtralConfig(num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                       num_experts_per_tok=2, **{**_COMMON, "intermediate_size": 16}),
    "olmo2": lambda: T.Olmo2Config(num_attention_heads=4, num_key_value_heads=2, **_COMMON),
    "olmo3": lambda: T.Olmo3Config(num_attention_heads=4, num_key_value_heads=2, sliding_window=3,
                                   layer_types=["sliding_attention", "full_attention"], **_COMMON),
    "gemma3_text": lambda: T.Gemma3TextConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                              sliding_window=3, layer_types=["sliding_attention", "full_attention"],
                                              **_COMMON),
    "gpt_oss": lambda: T.GptOssConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                      num_experts_per_tok=2, sliding_window=3,
                                      layer_types=["sliding_attention", "full_attention"],
                                      rope_parameters={"rope_type": "default", "rope_theta": 150000.0},  # no YaRN
                                      **{**_COMMON, "intermediate_size": 16}),
    # famB (issue 14): parallel blocks (GPT-J; Falcon-7B's multi-query layout and the new decoder architecture's
    # grouped kv), Phi-3 (fused qkv and gate_up).
    "gptj": lambda: T.GPTJConfig(n_layer=2, n_head=4, n_embd=32, rotary_dim=4, n_inner=64, vocab_size=VOCAB,
                                 n_positions=64, pad_token_id=0, bos_token_id=2, eos_token_id=2),
    "falcon": lambda: T.FalconConfig(num_attention_heads=4, multi_query=True, parallel_attn=True,
                                     new_decoder_architecture=False, bias=False, ffn_hidden_size=64,
                                     **{k: v for k, v in _COMMON.items() if k != "intermediate_size"}),
    "falcon_new": lambda: T.FalconConfig(num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
                                         bias=True, ffn_hidden_size=64,
                                         **{k: v for k, v in _COMMON.items() if k != "intermediate_size"}),
    "phi3": lambda: T.Phi3Config(num_attention_heads=4, num_key_value_heads=2, **_COMMON),
    # OPT (pre-norm: 125m, 1.3b and up): its MLP runs on the stream flattened to [batch * pos, d_model].
    "opt": lambda: T.OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                               word_embed_proj_dim=32, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                               bos_token_id=2, eos_token_id=2),
}
ARCHS = list(CONFIGS)


@functools.lru_cache(maxsize=None)
def tokenizer() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", padding_side="left")


def hf_model(arch: str, *, seed: int = 0, attn_implementation: str = "eager"):
    """A tiny random float32 model in eval mode; biases and norm weights are randomised too, so
    every term of the decompositions is exercised."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation=attn_implementation).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    n = sum(p.numel() for p in model.parameters())
    assert n < MAX_PARAMS, f"{arch} test model has {n} parameters: not tiny"
    return model


def prompts(n: int = 3, *, seed: int = 0, lengths=(5, 7, 4, 6)) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (lengths[i % len(lengths)],), generator=g)
        out.append(" ".join(WORDS[j] for j in ids))
    return out
