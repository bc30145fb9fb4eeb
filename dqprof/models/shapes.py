"""Turn a model config into the linear layers its decoder executes, as vLLM 0.20.2 runs them.

One ``LinearShape`` per distinct (module, n, k) that vLLM executes: fused qkv_proj and
gate_up_proj with their shards (the bitsandbytes path calls one GEMM per shard), and how many
times the shape runs per token. This table is the single source of shapes and call counts for
the sweep, the per-layer breakdown and the full-model reconciliation.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

from dqprof.errors import DqprofError
from dqprof.models.config import ModelConfig


@dataclass(frozen=True)
class LinearShape:
    name: str  # unique within a model, e.g. "sliding.qkv_proj"
    group: str  # breakdown group: attn.qkv, attn.o, mlp.gate_up, mlp.down, ple, lm_head
    n: int  # out_features of the (fused) layer
    k: int  # in_features
    shards: tuple[int, ...]  # out_features of each shard, in order (sum == n)
    shard_names: tuple[str, ...]
    calls_per_token: int  # executions per token (decode) / per prompt token (prefill)
    quantized: bool = True  # False: vLLM keeps it bf16 under every scheme (tied lm_head)
    per_sequence: bool = False  # True: runs once per sequence in prefill (logits of the last token)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shards"] = list(self.shards)
        d["shard_names"] = list(self.shard_names)
        return d


GEMMA4_TYPES = {"gemma4", "gemma4_text"}
DENSE_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text"}
DENSE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                "vocab_size")
GEMMA4_FIELDS = DENSE_FIELDS + ("num_key_value_heads", "head_dim", "layer_types")


def linear_shapes(cfg: ModelConfig) -> list[LinearShape]:
    """Every linear layer the decoder runs, fused as vLLM fuses them."""
    mt = cfg.model_type
    if mt in GEMMA4_TYPES:
        _require(cfg, GEMMA4_FIELDS)
        return _gemma4(cfg)
    if mt in DENSE_TYPES:
        _require(cfg, DENSE_FIELDS)
        return _dense(cfg)
    _require(cfg, DENSE_FIELDS + ("model_type",))
    known = ", ".join(sorted(GEMMA4_TYPES | DENSE_TYPES))
    raise DqprofError(f"model_type '{mt}' of {cfg.source} is not supported (known: {known})")


def _require(cfg: ModelConfig, fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if cfg.get(f) in (None, "")]
    if missing:
        raise DqprofError(f"config {cfg.source} lacks the fields {', '.join(missing)} "
                          f"needed to derive linear shapes")


def _attn(prefix: str, hidden: int, heads: int, kv_heads: int, head_dim: int, count: int
          ) -> list[LinearShape]:
    q, kv = heads * head_dim, kv_heads * head_dim
    return [
        LinearShape(f"{prefix}qkv_proj", "attn.qkv", q + 2 * kv, hidden, (q, kv, kv),
                    ("q_proj", "k_proj", "v_proj"), count),
        LinearShape(f"{prefix}o_proj", "attn.o", hidden, q, (hidden,), ("o_proj",), count),
    ]


def _mlp(hidden: int, inter: int, count: int) -> list[LinearShape]:
    return [
        LinearShape("mlp.gate_up_proj", "mlp.gate_up", 2 * inter, hidden, (inter, inter),
                    ("gate_proj", "up_proj"), count),
        LinearShape("mlp.down_proj", "mlp.down", hidden, inter, (hidden,), ("down_proj",), count),
    ]


def _lm_head(cfg: ModelConfig) -> LinearShape:
    hidden, vocab = cfg.get("hidden_size"), cfg.get("vocab_size")
    # vLLM quantizes no ParallelLMHead under bitsandbytes, and GPTQ/AWQ checkpoints keep
    # lm_head bf16 unless lm_head_quantized; a tied head is the bf16 embedding itself.
    return LinearShape("lm_head", "lm_head", vocab, hidden, (vocab,), ("lm_head",), 1,
                       quantized=False, per_sequence=True)


def _gemma4(cfg: ModelConfig) -> list[LinearShape]:
    hidden = cfg.get("hidden_size")
    heads, kv_heads = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    global_kv = cfg.get("num_global_key_value_heads") or kv_heads
    head_dim = cfg.get("head_dim")
    global_head_dim = cfg.get("global_head_dim") or head_dim
    layers = cfg.get("num_hidden_layers")
    types = list(cfg.get("layer_types"))
    if len(types) != layers:
        raise DqprofError(f"config {cfg.source}: layer_types has {len(types)} entries "
                          f"for {layers} layers")
    if cfg.get("enable_moe_block"):
        raise DqprofError(f"config {cfg.source}: Gemma 4 MoE blocks are not supported yet")
    if cfg.get("use_double_wide_mlp"):
        raise DqprofError(f"config {cfg.source}: use_double_wide_mlp is not supported yet")
    counts = Counter(types)
    shapes: list[LinearShape] = []
    # vLLM builds qkv_proj on every layer, KV-shared ones included, so all of them count.
    if counts["sliding_attention"]:
        shapes += _attn("sliding.", hidden, heads, kv_heads, head_dim, counts["sliding_attention"])
    if counts["full_attention"]:
        shapes += _attn("full.", hidden, heads, global_kv, global_head_dim,
                        counts["full_attention"])
    shapes += _mlp(hidden, cfg.get("intermediate_size"), layers)
    ple = cfg.get("hidden_size_per_layer_input") or 0
    if ple:
        shapes += [
            LinearShape("ple.per_layer_input_gate", "ple", ple, hidden, (ple,),
                        ("per_layer_input_gate",), layers),
            LinearShape("ple.per_layer_projection", "ple", hidden, ple, (hidden,),
                        ("per_layer_projection",), layers),
            LinearShape("ple.per_layer_model_projection", "ple", ple * layers, hidden,
                        (ple * layers,), ("per_layer_model_projection",), 1),
        ]
    return shapes + [_lm_head(cfg)]


def _dense(cfg: ModelConfig) -> list[LinearShape]:
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    layers = cfg.get("num_hidden_layers")
    return (_attn("attn.", hidden, heads, kv_heads, head_dim, layers)
            + _mlp(hidden, cfg.get("intermediate_size"), layers) + [_lm_head(cfg)])


def select_shapes(shapes: list[LinearShape], pattern: str | None) -> list[LinearShape]:
    """Filter by comma-separated substrings of the shape name or group (None keeps all)."""
    if not pattern:
        return shapes
    wanted = [p.strip() for p in pattern.split(",") if p.strip()]
    chosen = [s for s in shapes if any(w in s.name or w == s.group for w in wanted)]
    if not chosen:
        names = ", ".join(s.name for s in shapes)
        raise DqprofError(f"no shape matches '{pattern}' (shapes: {names})")
    return chosen
