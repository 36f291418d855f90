"""One normalised `ModelConfig` read from a checkpoint's config.json, whatever family wrote it.

Each supported `model_type` has one reader below that maps its keys onto the common fields;
keys a reader does not need are ignored. Validation lives in `ModelConfig.__post_init__`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError

SUPPORTED_MODEL_TYPES = ("deepseek", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a MoE decoder, independent of the family that wrote it.

    `moe_layers[i]` is True where layer i has a routed-expert block, False where it has a
    dense MLP of width `intermediate_size`.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    moe_layers: tuple[bool, ...]
    norm_topk_prob: bool = False
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE scales the shared expert by sigmoid(gate(x))
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None  # None, "head" (Qwen3: per head) or "full" (OLMoE: whole projection)
    clip_qkv: float | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(_unsupported(self.model_type))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "num_experts", "top_k", "moe_intermediate_size"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_kv_heads})")
        if self.top_k > self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.top_k}) exceeds the number of experts "
                              f"({self.num_experts})")
        if len(self.moe_layers) != self.num_layers:
            raise ConfigError(f"moe_layers has {len(self.moe_layers)} entries for "
                              f"{self.num_layers} layers")
        if not all(self.moe_layers) and self.intermediate_size <= 0:
            raise ConfigError("intermediate_size must be positive when some layers are dense")
        if self.qk_norm not in (None, "head", "full"):
            raise ConfigError(f"qk_norm must be None, 'head' or 'full', got {self.qk_norm!r}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, is_moe in enumerate(self.moe_layers) if is_moe]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d


def load_config(path: str | Path) -> ModelConfig:
    """Read `path/config.json` (or a config.json path) into a ModelConfig."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such model folder")
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ConfigError(f"{file}: not found; a model folder needs the config.json that "
                          "Hugging Face checkpoints ship with")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e}); restore the file from the original "
                          "checkpoint") from None
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw.get("model_type")
    reader = _READERS.get(model_type)
    if reader is None:
        raise ConfigError(_unsupported(model_type))
    try:
        common = _common(raw)
        common.update(reader(raw))
    except KeyError as e:
        raise ConfigError(f"field {e.args[0]!r} is missing (model_type {model_type!r})") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"a field has the wrong type: {e}") from None
    return ModelConfig(model_type=model_type, **common)


def _unsupported(model_type: Any) -> str:
    return (f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")


def _rope_theta(raw: dict) -> float:
    # transformers 5 writes rope_parameters {rope_theta, rope_type}; hub files have rope_theta.
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConfigError(f"rope type {kind!r} (rope_scaling/rope_parameters) is not supported "
                          "yet; only plain rotary embeddings are")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def _eos_ids(raw: dict) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


def _common(raw: dict) -> dict:
    heads = int(raw["num_attention_heads"])
    return dict(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or int(raw["hidden_size"]) // heads),
        intermediate_size=int(raw.get("intermediate_size") or 0),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(raw),
        max_position_embeddings=int(raw.get("max_position_embeddings") or 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
    )


def _check_act(raw: dict) -> None:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported; only 'silu' (SwiGLU) is")


def _deepseek(raw: dict) -> dict:
    _check_act(raw)
    n = int(raw["num_hidden_layers"])
    first_dense, freq = int(raw.get("first_k_dense_replace", 0)), int(raw.get("moe_layer_freq", 1))
    scoring = raw.get("scoring_func", "softmax")
    if scoring != "softmax":
        raise ConfigError(f"scoring_func {scoring!r} is not supported; only 'softmax' is")
    experts = raw.get("n_routed_experts")
    moe = tuple(experts is not None and i >= first_dense and i % freq == 0 for i in range(n))
    width = int(raw["moe_intermediate_size"])
    return dict(
        num_experts=int(experts or 0), top_k=int(raw["num_experts_per_tok"]),
        moe_intermediate_size=width, moe_layers=moe,
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        shared_intermediate_size=int(raw.get("n_shared_experts") or 0) * width,
        qkv_bias=bool(raw.get("attention_bias", False)), o_bias=bool(raw.get("attention_bias", False)),
    )


def _qwen_moe_layers(raw: dict) -> tuple[bool, ...]:
    n, step = int(raw["num_hidden_layers"]), int(raw.get("decoder_sparse_step", 1))
    dense = set(raw.get("mlp_only_layers") or [])
    experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
    return tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n))


def _window(raw: dict) -> int | None:
    if raw.get("use_sliding_window", True) and raw.get("sliding_window"):
        return int(raw["sliding_window"])
    return None


def _qwen2_moe(raw: dict) -> dict:
    _check_act(raw)
    return dict(
        num_experts=int(raw["num_experts"]), top_k=int(raw["num_experts_per_tok"]),
        moe_intermediate_size=int(raw["moe_intermediate_size"]), moe_layers=_qwen_moe_layers(raw),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        shared_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0),
        shared_expert_gate=bool(raw.get("shared_expert_intermediate_size")),
        qkv_bias=bool(raw.get("qkv_bias", True)), sliding_window=_window(raw),
    )


def _qwen3_moe(raw: dict) -> dict:
    _check_act(raw)
    bias = bool(raw.get("attention_bias", False))
    return dict(
        num_experts=int(raw.get("num_experts") or raw["num_local_experts"]),
        top_k=int(raw["num_experts_per_tok"]),
        moe_intermediate_size=int(raw["moe_intermediate_size"]), moe_layers=_qwen_moe_layers(raw),
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)), qkv_bias=bias, o_bias=bias,
        qk_norm="head", sliding_window=_window(raw),
    )


def _mixtral(raw: dict) -> dict:
    _check_act(raw)
    n = int(raw["num_hidden_layers"])
    return dict(
        num_experts=int(raw["num_local_experts"]), top_k=int(raw["num_experts_per_tok"]),
        # Mixtral's experts are as wide as its (absent) dense MLP: intermediate_size.
        moe_intermediate_size=int(raw["intermediate_size"]), moe_layers=(True,) * n,
        norm_topk_prob=True, sliding_window=_window(raw),
    )


def _olmoe(raw: dict) -> dict:
    _check_act(raw)
    n, bias = int(raw["num_hidden_layers"]), bool(raw.get("attention_bias", False))
    clip = raw.get("clip_qkv")
    return dict(
        num_experts=int(raw["num_experts"]), top_k=int(raw["num_experts_per_tok"]),
        moe_intermediate_size=int(raw["intermediate_size"]), moe_layers=(True,) * n,
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)), qkv_bias=bias, o_bias=bias,
        qk_norm="full", clip_qkv=None if clip is None else float(clip),
    )


_READERS: dict[str, Callable[[dict], dict]] = {
    "deepseek": _deepseek, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral, "olmoe": _olmoe,
}
