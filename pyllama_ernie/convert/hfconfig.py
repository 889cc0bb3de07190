"""Reading and normalising a checkpoint's ``config.json``.

Each supported architecture (the ``architectures[0]`` string of config.json) has a
parser here that turns the raw JSON into a :class:`TextConfig`: one flat record of
what the language model needs, with the defaults transformers' config classes use
when a key is absent, so a converted file matches what transformers would build.

To support another architecture (e.g. ERNIE 4.5 VL, whose config exists in an
HF-native form with ``text_config``/``vision_config`` and in Baidu's original
remote-code form), add a parser and register it in ``_PARSERS``; a parser may fill
``HFConfig.extra`` with whatever else its converter module needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConversionError

__all__ = ["MoeConfig", "TextConfig", "HFConfig", "load_config", "parse_config", "SUPPORTED_ARCHITECTURES"]


@dataclass
class MoeConfig:
    """The mixture-of-experts part of a text config (transformers' names in comments)."""

    n_experts: int  # moe_num_experts
    top_k: int  # moe_k
    n_shared: int  # moe_num_shared_experts
    expert_ff: int  # moe_intermediate_size (one expert's FFN width)
    layer_start: int  # moe_layer_start_index
    layer_end: int  # moe_layer_end_index (resolved: -1 -> last layer)
    layer_interval: int  # moe_layer_interval

    @property
    def shared_ff(self) -> int:
        """Width of the shared-experts FFN (all shared experts fused into one)."""
        return self.expert_ff * self.n_shared

    def moe_layers(self, n_layers: int) -> list[int]:
        """Indices of the MoE layers, by transformers' rule."""
        return [
            i
            for i in range(n_layers)
            if (i + 1) % self.layer_interval == 0 and self.layer_start <= i <= self.layer_end
        ]


@dataclass
class TextConfig:
    """What the language model needs, normalised."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    head_dim_in_config: bool  # transformers' config carries head_dim (llama.cpp then gets key/value_length)
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # rope_parameters/rope_scaling when not the default rope
    tie_word_embeddings: bool
    use_bias: bool
    moe: MoeConfig | None = None


@dataclass
class HFConfig:
    """A loaded config.json: which architecture, the raw JSON and the normalised text part."""

    path: Path
    architecture: str
    raw: dict[str, Any]
    text: TextConfig
    extra: dict[str, Any] = field(default_factory=dict)


# -- helpers -----------------------------------------------------------------------------------

_MISSING = object()


def _value(cfg: dict[str, Any], key: str, default: Any) -> Any:
    val = cfg.get(key)
    if val is None:
        if default is _MISSING:
            raise ConversionError(f"config.json has no {key!r}, which this architecture needs.")
        return default
    return val


def _int(cfg: dict[str, Any], key: str, default: Any = _MISSING, *, minimum: int | None = None) -> int:
    val = _value(cfg, key, default)
    if not isinstance(val, int) or isinstance(val, bool):
        raise ConversionError(f"config.json: {key!r} should be an integer, not {val!r}.")
    if minimum is not None and val < minimum:
        raise ConversionError(f"config.json: {key!r} must be at least {minimum}, got {val}.")
    return val


def _float(cfg: dict[str, Any], key: str, default: Any = _MISSING) -> float:
    val = _value(cfg, key, default)
    if not isinstance(val, (int, float)) or isinstance(val, bool):
        raise ConversionError(f"config.json: {key!r} should be a number, not {val!r}.")
    return float(val)


def _bool(cfg: dict[str, Any], key: str, default: Any = _MISSING) -> bool:
    val = _value(cfg, key, default)
    if not isinstance(val, bool):
        raise ConversionError(f"config.json: {key!r} should be true or false, not {val!r}.")
    return val


def _rope(cfg: dict[str, Any], default_theta: float) -> tuple[float, dict[str, Any] | None]:
    """rope theta and (non-default) scaling from either rope_parameters (transformers >= 5) or the older keys."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConversionError(f"config.json: rope_parameters has an unexpected value {params!r}.")
    theta = params.get("rope_theta", cfg.get("rope_theta", default_theta))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ConversionError(f"config.json: rope_theta has an unexpected value {theta!r}.")
    rope_type = params.get("rope_type", params.get("type"))
    scaling = None if rope_type in (None, "default") else dict(params, rope_type=rope_type)
    return float(theta), scaling


# -- ERNIE 4.5 text models ---------------------------------------------------------------------

_ERNIE_DEFAULT_THETA = 500000.0


def _ernie_common(cfg: dict[str, Any], *, dense: bool) -> TextConfig:
    hidden = _int(cfg, "hidden_size", minimum=1)
    n_heads = _int(cfg, "num_attention_heads", minimum=1)
    n_kv = _int(cfg, "num_key_value_heads", n_heads, minimum=1)
    if n_heads % n_kv:
        raise ConversionError(f"config.json: num_attention_heads ({n_heads}) is not a multiple of num_key_value_heads ({n_kv}).")
    # transformers: Ernie4_5Config has head_dim (default 128, null -> hidden/heads);
    # Ernie4_5_MoeConfig has no such field and the model uses hidden/heads unless config.json sets one.
    if dense:
        head_dim = cfg.get("head_dim", 128)
        head_dim_in_config = True
    else:
        head_dim = cfg.get("head_dim")
        head_dim_in_config = head_dim is not None
    if head_dim is None:
        if hidden % n_heads:
            raise ConversionError(f"config.json: hidden_size ({hidden}) is not a multiple of num_attention_heads ({n_heads}).")
        head_dim = hidden // n_heads
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0:
        raise ConversionError(f"config.json: head_dim has an unexpected value {head_dim!r}.")
    theta, scaling = _rope(cfg, _ERNIE_DEFAULT_THETA)
    return TextConfig(
        vocab_size=_int(cfg, "vocab_size", 103424, minimum=1),
        hidden_size=hidden,
        intermediate_size=_int(cfg, "intermediate_size", minimum=1),
        n_layers=_int(cfg, "num_hidden_layers", minimum=1),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        head_dim_in_config=head_dim_in_config,
        max_position_embeddings=_int(cfg, "max_position_embeddings", 131072, minimum=1),
        rms_norm_eps=_float(cfg, "rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=_bool(cfg, "tie_word_embeddings", True),
        use_bias=_bool(cfg, "use_bias", False),
    )


def _parse_ernie4_5(cfg: dict[str, Any]) -> TextConfig:
    return _ernie_common(cfg, dense=True)


def _parse_ernie4_5_moe(cfg: dict[str, Any]) -> TextConfig:
    text = _ernie_common(cfg, dense=False)
    for key in ("moe_num_experts", "moe_intermediate_size"):
        if isinstance(cfg.get(key), list):
            raise ConversionError(
                f"config.json: {key} is a list ({cfg[key]}), which is the multimodal (VL) layout; "
                "Ernie4_5_MoeForCausalLM needs a single number."
            )
    n_layers = text.n_layers
    end = _int(cfg, "moe_layer_end_index", -1)
    end = n_layers - 1 if end == -1 else end
    moe = MoeConfig(
        n_experts=_int(cfg, "moe_num_experts", 64, minimum=1),
        top_k=_int(cfg, "moe_k", 6, minimum=1),
        n_shared=_int(cfg, "moe_num_shared_experts", 2, minimum=0),
        expert_ff=_int(cfg, "moe_intermediate_size", 1536, minimum=1),
        layer_start=_int(cfg, "moe_layer_start_index", 1, minimum=0),
        layer_end=end,
        layer_interval=_int(cfg, "moe_layer_interval", 1, minimum=1),
    )
    if moe.top_k > moe.n_experts:
        raise ConversionError(f"config.json: moe_k ({moe.top_k}) exceeds moe_num_experts ({moe.n_experts}).")
    text.moe = moe
    return text


# architectures[0] -> parser. Baidu's remote code calls the dense model "Ernie4_5_ForCausalLM".
_PARSERS: dict[str, Callable[[dict[str, Any]], TextConfig]] = {
    "Ernie4_5ForCausalLM": _parse_ernie4_5,
    "Ernie4_5_ForCausalLM": _parse_ernie4_5,
    "Ernie4_5_MoeForCausalLM": _parse_ernie4_5_moe,
}
# config.json without "architectures": guess from model_type
_MODEL_TYPES = {"ernie4_5": "Ernie4_5ForCausalLM", "ernie4_5_moe": "Ernie4_5_MoeForCausalLM"}

SUPPORTED_ARCHITECTURES = tuple(_PARSERS)


def parse_config(raw: dict[str, Any], path: Path | None = None) -> HFConfig:
    """Normalise an already loaded config.json."""
    if not isinstance(raw, dict):
        raise ConversionError("config.json is not a JSON object.")
    archs = raw.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        arch = archs[0]
    elif isinstance(raw.get("model_type"), str) and raw["model_type"] in _MODEL_TYPES:
        arch = _MODEL_TYPES[raw["model_type"]]
    else:
        raise ConversionError("config.json names no architecture (no 'architectures' list or known 'model_type').")
    parser = _PARSERS.get(arch)
    if parser is None:
        raise ConversionError(
            f"unsupported architecture {arch!r}; this converter handles {', '.join(sorted(set(_PARSERS)))}."
        )
    return HFConfig(path=path or Path("config.json"), architecture=arch, raw=raw, text=parser(raw))


def load_config(hf_dir: str | Path) -> HFConfig:
    """Read and normalise ``hf_dir/config.json``; ConversionError on anything unusable."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"no config.json in {hf_dir}: is this a Hugging Face model folder?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from e
    return parse_config(raw, path)
