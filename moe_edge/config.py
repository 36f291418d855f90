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
FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # what torch_dtype may say
_MISSING = object()


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
        self._check_ranges()

    def _check_ranges(self) -> None:
        positive = {"rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
                    "rms_norm_eps": self.rms_norm_eps}
        for name, value in positive.items():
            if not value > 0 or value == float("inf"):
                raise ConfigError(f"{name} must be a positive number, got {value!r}; restore it "
                                  "from the original checkpoint")
        if self.intermediate_size < 0 or self.shared_intermediate_size < 0:
            raise ConfigError("intermediate sizes must not be negative; restore config.json from "
                              "the original checkpoint")
        if self.torch_dtype not in FLOAT_DTYPES:
            raise ConfigError(f"torch_dtype {self.torch_dtype!r} is not a float type; use one of "
                              f"{', '.join(FLOAT_DTYPES)}")

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, is_moe in enumerate(self.moe_layers) if is_moe]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d


def read_json_object(file: Path, what: str, error: type = ConfigError) -> dict:
    """A JSON object from `file`, or a one-line `error` naming the file when it is not UTF-8
    JSON, is not an object, or repeats a key (json.loads would silently keep the last)."""
    def no_repeats(pairs):
        d = dict(pairs)
        if len(d) < len(pairs):  # linear: a sharded index lists ~100k tensors
            seen = set()
            repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise error(f"{file}: key {repeated!r} appears twice; {what} must name each key once")
        return d
    try:
        raw = json.loads(file.read_text(encoding="utf-8"), object_pairs_hook=no_repeats)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{file}: not valid JSON ({e}); restore {what} from the original "
                    "checkpoint") from None
    if not isinstance(raw, dict):
        raise error(f"{file}: is a JSON {type(raw).__name__}, but {what} must be a JSON object; "
                    "restore it from the original checkpoint")
    return raw


def load_config(path: str | Path) -> ModelConfig:
    """Read `path/config.json` (or a config.json path) into a ModelConfig."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such model folder")
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ConfigError(f"{file}: not found; a model folder needs the config.json that "
                          "Hugging Face checkpoints ship with")
    raw = read_json_object(file, "config.json")
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a JSON object, got a {type(raw).__name__}")
    model_type = raw.get("model_type")
    reader = _READERS.get(model_type) if isinstance(model_type, str) else None
    if reader is None:
        raise ConfigError(_unsupported(model_type))
    try:
        common = _common(raw)
        common.update(reader(raw))
    except KeyError as e:
        raise ConfigError(f"field {e.args[0]!r} is missing (model_type {model_type!r})") from None
    config = ModelConfig(model_type=model_type, **common)
    if not any(config.moe_layers):  # a checkpoint, not a part built alone (one attention layer)
        raise ConfigError("no layer has routed experts (check num_hidden_layers, "
                          "first_k_dense_replace, moe_layer_freq / decoder_sparse_step, "
                          "mlp_only_layers); moe-edge runs MoE models only")
    return config


def _unsupported(model_type: Any) -> str:
    return (f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")


def number_field(raw: dict, key: str, kind: type = float, default: Any = _MISSING):
    """`raw[key]` as an int or float, or a ConfigError naming the field. A missing key (or
    null) is `default`; without a default it is a KeyError (a missing field)."""
    value = raw.get(key)
    if value is None:
        if default is _MISSING:
            raise KeyError(key)
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"field {key!r} must be {'an integer' if kind is int else 'a number'}, "
                          f"got {value!r}")
    return kind(value)


GENERATION_NUMBERS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float,
                      "repetition_penalty": float, "max_new_tokens": int}


def read_generation_json(file: Path) -> dict:
    """generation_config.json ({} when absent) with its sampling numbers, do_sample and
    eos_token_id checked; a ConfigError naming the file and the field otherwise."""
    if not file.exists():
        return {}
    raw = read_json_object(file, "generation_config.json")
    try:
        for key, kind in GENERATION_NUMBERS.items():
            raw[key] = number_field(raw, key, kind, None)
        _bool(raw, "do_sample", True)
        _eos_ids(raw)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}; fix the field or delete the file") from None
    return {k: v for k, v in raw.items() if v is not None}


def _int(raw: dict, key: str, default: Any = _MISSING) -> int:
    return number_field(raw, key, int, default)


def _float(raw: dict, key: str, default: Any = _MISSING) -> float:
    return number_field(raw, key, float, default)


def _bool(raw: dict, key: str, default: bool) -> bool:
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"field {key!r} must be true or false, got {value!r}")
    return value


def _rope_theta(raw: dict) -> float:
    # transformers 5 writes rope_parameters {rope_theta, rope_type}; hub files have rope_theta.
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError("fields 'rope_parameters' and 'rope_scaling' must be objects or null")
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConfigError(f"rope type {kind!r} (rope_scaling/rope_parameters) is not supported "
                          "yet; only plain rotary embeddings are")
    return _float(params, "rope_theta") if "rope_theta" in params else _float(raw, "rope_theta", 10000.0)


def _eos_ids(raw: dict) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(_int({"eos_token_id": e}, "eos_token_id") for e in (eos if isinstance(eos, list) else [eos]))


def _common(raw: dict) -> dict:
    heads, hidden = _int(raw, "num_attention_heads"), _int(raw, "hidden_size")
    if heads <= 0:
        raise ConfigError(f"num_attention_heads must be a positive integer, got {heads}")
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    return dict(
        vocab_size=_int(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=_int(raw, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=_int(raw, "num_key_value_heads", heads),
        head_dim=_int(raw, "head_dim", hidden // heads),
        intermediate_size=_int(raw, "intermediate_size", 0),
        rms_norm_eps=_float(raw, "rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(raw),
        max_position_embeddings=_int(raw, "max_position_embeddings", 4096),
        tie_word_embeddings=_bool(raw, "tie_word_embeddings", False),
        bos_token_id=_int(raw, "bos_token_id", None),
        eos_token_ids=_eos_ids(raw),
        torch_dtype=str(dtype),
    )


def _check_act(raw: dict) -> None:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported; only 'silu' (SwiGLU) is")


def _deepseek(raw: dict) -> dict:
    _check_act(raw)
    n = _int(raw, "num_hidden_layers")
    first_dense, freq = _int(raw, "first_k_dense_replace", 0), _int(raw, "moe_layer_freq", 1)
    shared = _int(raw, "n_shared_experts", 0)
    if not 0 <= first_dense < n or freq <= 0 or shared < 0:
        raise ConfigError(f"first_k_dense_replace ({first_dense}) must lie in [0, num_hidden_layers "
                          f"= {n}), moe_layer_freq ({freq}) must be positive and n_shared_experts "
                          f"({shared}) not negative; restore config.json from the original checkpoint")
    scoring = raw.get("scoring_func", "softmax")
    if scoring != "softmax":
        raise ConfigError(f"scoring_func {scoring!r} is not supported; only 'softmax' is")
    experts = _int(raw, "n_routed_experts", None)
    moe = tuple(experts is not None and i >= first_dense and i % freq == 0 for i in range(n))
    width = _int(raw, "moe_intermediate_size")
    bias = _bool(raw, "attention_bias", False)
    return dict(
        num_experts=experts or 0, top_k=_int(raw, "num_experts_per_tok"),
        moe_intermediate_size=width, moe_layers=moe,
        norm_topk_prob=_bool(raw, "norm_topk_prob", False),
        shared_intermediate_size=shared * width, qkv_bias=bias, o_bias=bias,
    )


def _qwen_moe_layers(raw: dict) -> tuple[bool, ...]:
    n, step = _int(raw, "num_hidden_layers"), _int(raw, "decoder_sparse_step", 1)
    if step <= 0:
        raise ConfigError(f"decoder_sparse_step must be a positive integer, got {step}")
    dense = raw.get("mlp_only_layers") or []
    if not isinstance(dense, list):
        raise ConfigError(f"field 'mlp_only_layers' must be a list of layer numbers, got {dense!r}")
    experts = _int(raw, "num_experts", None) or _int(raw, "num_local_experts", 0)
    return tuple(i not in set(dense) and experts > 0 and (i + 1) % step == 0 for i in range(n))


def _window(raw: dict) -> int | None:
    if _bool(raw, "use_sliding_window", True) and raw.get("sliding_window"):
        return _int(raw, "sliding_window")
    return None


def _qwen2_moe(raw: dict) -> dict:
    _check_act(raw)
    shared = _int(raw, "shared_expert_intermediate_size", 0)
    return dict(
        num_experts=_int(raw, "num_experts"), top_k=_int(raw, "num_experts_per_tok"),
        moe_intermediate_size=_int(raw, "moe_intermediate_size"), moe_layers=_qwen_moe_layers(raw),
        norm_topk_prob=_bool(raw, "norm_topk_prob", False),
        shared_intermediate_size=shared, shared_expert_gate=bool(shared),
        qkv_bias=_bool(raw, "qkv_bias", True), sliding_window=_window(raw),
    )


def _qwen3_moe(raw: dict) -> dict:
    _check_act(raw)
    bias = _bool(raw, "attention_bias", False)
    return dict(
        num_experts=_int(raw, "num_experts", None) or _int(raw, "num_local_experts"),
        top_k=_int(raw, "num_experts_per_tok"),
        moe_intermediate_size=_int(raw, "moe_intermediate_size"), moe_layers=_qwen_moe_layers(raw),
        norm_topk_prob=_bool(raw, "norm_topk_prob", True), qkv_bias=bias, o_bias=bias,
        qk_norm="head", sliding_window=_window(raw),
    )


def _mixtral(raw: dict) -> dict:
    _check_act(raw)
    n = _int(raw, "num_hidden_layers")
    return dict(
        num_experts=_int(raw, "num_local_experts"), top_k=_int(raw, "num_experts_per_tok"),
        # Mixtral's experts are as wide as its (absent) dense MLP: intermediate_size.
        moe_intermediate_size=_int(raw, "intermediate_size"), moe_layers=(True,) * n,
        norm_topk_prob=True, sliding_window=_window(raw),
    )


def _olmoe(raw: dict) -> dict:
    _check_act(raw)
    n, bias = _int(raw, "num_hidden_layers"), _bool(raw, "attention_bias", False)
    return dict(
        num_experts=_int(raw, "num_experts"), top_k=_int(raw, "num_experts_per_tok"),
        moe_intermediate_size=_int(raw, "intermediate_size"), moe_layers=(True,) * n,
        norm_topk_prob=_bool(raw, "norm_topk_prob", False), qkv_bias=bias, o_bias=bias,
        qk_norm="full", clip_qkv=_float(raw, "clip_qkv", None),
    )


_READERS: dict[str, Callable[[dict], dict]] = {
    "deepseek": _deepseek, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral, "olmoe": _olmoe,
}
