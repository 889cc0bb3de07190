"""Reading and normalising a checkpoint's ``config.json``.

Each supported architecture (the ``architectures[0]`` string of config.json) has a
parser here that turns the raw JSON into a :class:`TextConfig`: one flat record of
what the language model needs, with the defaults transformers' config classes use
when a key is absent, so a converted file matches what transformers would build.

ERNIE 4.5 VL (``Ernie4_5_VLMoeForConditionalGeneration``) comes in two config
formats, both normalised here into the same :class:`TextConfig` (plus vision facts
in ``HFConfig.extra``):

* HF-native (transformers >= 5): ``text_config`` / ``vision_config``,
  ``rope_parameters.mrope_section`` ([h, w, t] rope pairs), ``mlp_layer_types``,
  one ``moe_num_experts`` for both pools, ``moe_intermediate_size`` [text, vision];
* Baidu's original remote-code config (``model_type`` ``ernie4_5_moe_vl``, flat):
  ``moe_num_experts`` / ``moe_intermediate_size`` as [text, vision] lists,
  ``moe_layer_start_index`` / ``moe_layer_end_index`` (int or per-modality list) and
  ``moe_layer_interval``, ``freq_allocation`` (the t share of the rope pairs;
  h = w = (head_dim / 2 - t) / 2), ``rope_3d``, and a ``vision_config`` with
  ``embed_dim`` / ``depth`` / ``num_heads`` / ``mlp_ratio``. Keys it leaves out get
  the defaults of Baidu's remote-code config class.

To support another architecture, add a parser and register it in ``_PARSERS``; a
parser returns a TextConfig, or (TextConfig, extra) to fill ``HFConfig.extra``.

The VL vision tower and resampler (for the mmproj file) are read separately, on demand, by
:func:`load_vision_config`, so that a vision section the mmproj writer cannot handle never
stops a conversion of the language model alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConversionError

__all__ = ["SUPPORTED_ARCHITECTURES", "HFConfig", "MoeConfig", "TextConfig", "VisionConfig", "load_config",
           "load_vision_config", "parse_config"]


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
    # ERNIE 4.5 VL: the vision expert pool (experts n_experts .. n_experts + n_experts_vl - 1)
    n_experts_vl: int | None = None  # moe_num_experts[1]
    expert_ff_vl: int | None = None  # moe_intermediate_size[1]
    layers: tuple[int, ...] | None = None  # explicit MoE layers (HF-native VL: mlp_layer_types)

    @property
    def shared_ff(self) -> int:
        """Width of the shared-experts FFN (all shared experts fused into one)."""
        return self.expert_ff * self.n_shared

    def moe_layers(self, n_layers: int) -> list[int]:
        """Indices of the MoE layers, by transformers' rule (or as listed in the config)."""
        if self.layers is not None:
            return list(self.layers)
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
    mrope_section: tuple[int, int, int] | None = None  # ERNIE 4.5 VL: rope pairs per axis, [h, w, t]


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


# -- ERNIE 4.5 VL ------------------------------------------------------------------------------

VL_ARCHITECTURE = "Ernie4_5_VLMoeForConditionalGeneration"

# transformers' Ernie4_5_VLMoeConfig defaults for the special token ids
_VL_TOKEN_DEFAULTS = {
    "image_token_id": 100295, "image_start_token_id": 101304, "image_end_token_id": 101305,
    "video_token_id": 103367, "video_start_token_id": 101306, "video_end_token_id": 101307,
}


def _int_pair(cfg: dict[str, Any], key: str, default: Any) -> tuple[int, int]:
    """A [text, vision] pair given as a list of two integers or one integer for both."""
    val = _value(cfg, key, default)
    if isinstance(val, list) and len(val) == 1:
        val = val[0]
    if isinstance(val, int) and not isinstance(val, bool):
        return val, val
    if (isinstance(val, list) and len(val) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in val)):
        return val[0], val[1]
    raise ConversionError(f"config.json: {key!r} should be an integer or a [text, vision] pair, not {val!r}.")


def _int_list(cfg: dict[str, Any], key: str, default: Any) -> list[int]:
    val = _value(cfg, key, default)
    vals = val if isinstance(val, list) else [val]
    if not vals or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise ConversionError(f"config.json: {key!r} should be an integer or a list of integers, not {val!r}.")
    return vals


def _vl_checks(text: TextConfig, hidden_act: Any) -> None:
    if hidden_act not in (None, "silu"):
        raise ConversionError(f"config.json: hidden_act {hidden_act!r} is not supported; ERNIE 4.5 VL uses silu.")
    if text.rope_scaling is not None:
        raise ConversionError(
            f"config.json asks for rope scaling {text.rope_scaling!r}; the 3-D rope layout of ernie4_5-vl-moe "
            "cannot be scaled (llama.cpp refuses it), so this converter does not write it."
        )
    moe = text.moe
    assert moe is not None and moe.n_experts_vl is not None and moe.expert_ff_vl is not None
    for what, v in (("text experts", moe.n_experts), ("vision experts", moe.n_experts_vl),
                    ("text expert width", moe.expert_ff), ("vision expert width", moe.expert_ff_vl)):
        if v < 1:
            raise ConversionError(f"config.json: the number of {what} must be at least 1, got {v}.")
    if moe.top_k > min(moe.n_experts, moe.n_experts_vl):
        raise ConversionError(
            f"config.json: moe_k ({moe.top_k}) exceeds the number of experts "
            f"({moe.n_experts} text, {moe.n_experts_vl} vision)."
        )
    if moe.n_shared < 0:
        raise ConversionError(f"config.json: moe_num_shared_experts must be at least 0, got {moe.n_shared}.")
    h, w, t = text.mrope_section or (0, 0, 0)
    half = text.head_dim // 2
    if text.head_dim % 2 or min(h, w, t) < 0 or h + w + t != half or h != w:
        raise ConversionError(
            f"config.json: the 3-D rope sections [h, w, t] = {[h, w, t]} do not fit head_dim {text.head_dim} "
            f"(need h == w and h + w + t == head_dim / 2 = {half})."
        )


def _parse_vl_hf(raw: dict[str, Any]) -> tuple[TextConfig, dict[str, Any]]:
    """The HF-native (transformers >= 5) Ernie4_5_VLMoeConfig."""
    cfg = raw["text_config"]
    if not isinstance(cfg, dict):
        raise ConversionError("config.json: text_config is not a JSON object.")
    text = _ernie_common(cfg, dense=False)
    # the composite model's flag decides whether lm_head is tied (transformers reads config.tie_word_embeddings)
    tie = raw.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True))
    if not isinstance(tie, bool):
        raise ConversionError(f"config.json: 'tie_word_embeddings' should be true or false, not {tie!r}.")
    text.tie_word_embeddings = tie
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    section = params.get("mrope_section", [22, 22, 20]) if isinstance(params, dict) else None
    if not (isinstance(section, list) and len(section) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) for v in section)):
        raise ConversionError(f"config.json: mrope_section should be three integers [h, w, t], not {section!r}.")
    text.mrope_section = (section[0], section[1], section[2])
    if text.rope_scaling is not None and text.rope_scaling.get("rope_type") == "mrope":
        text.rope_scaling = None  # transformers' old name for the default multimodal rope

    n = text.n_layers
    types = _value(cfg, "mlp_layer_types", ["dense"] + ["sparse"] * (n - 1))
    if not isinstance(types, list) or len(types) != n or not all(t in ("dense", "sparse") for t in types):
        raise ConversionError(
            f"config.json: mlp_layer_types should list 'dense' or 'sparse' for each of the {n} layers, not {types!r}."
        )
    layers = tuple(i for i, t in enumerate(types) if t == "sparse")
    n_text, n_vision = _int_pair(cfg, "moe_num_experts", 64)
    ff_text, ff_vision = _int_pair(cfg, "moe_intermediate_size", [1536, 512])
    # transformers' default is 2; an explicit null means none (as its conversion script writes it)
    n_shared = 0 if "moe_num_shared_experts" in cfg and cfg["moe_num_shared_experts"] is None else \
        _int(cfg, "moe_num_shared_experts", 2)
    text.moe = MoeConfig(
        n_experts=n_text,
        top_k=_int(cfg, "moe_k", 6, minimum=1),
        n_shared=n_shared,
        expert_ff=ff_text,
        layer_start=layers[0] if layers else n,
        layer_end=layers[-1] if layers else n - 1,
        layer_interval=1,
        n_experts_vl=n_vision,
        expert_ff_vl=ff_vision,
        layers=layers,
    )
    _vl_checks(text, cfg.get("hidden_act"))
    extra: dict[str, Any] = {"format": "hf"}
    for key, default in _VL_TOKEN_DEFAULTS.items():
        extra[key] = _int(raw, key, default)
    vision = raw.get("vision_config") or {}
    if isinstance(vision, dict):
        extra["vision"] = {k: vision.get(k) for k in ("depth", "hidden_size", "intermediate_size", "num_heads",
                                                      "patch_size", "spatial_merge_size", "temporal_merge_size")}
    return text, extra


def _parse_vl_baidu(raw: dict[str, Any]) -> tuple[TextConfig, dict[str, Any]]:
    """Baidu's original remote-code config (model_type ernie4_5_moe_vl): flat keys, remote-code defaults."""
    cfg = dict(raw)
    hidden = _int(cfg, "hidden_size", minimum=1)
    n_heads = _int(cfg, "num_attention_heads", minimum=1)
    n_kv = _int(cfg, "num_key_value_heads", n_heads, minimum=1)
    if n_heads % n_kv:
        raise ConversionError(f"config.json: num_attention_heads ({n_heads}) is not a multiple of num_key_value_heads ({n_kv}).")
    head_dim = cfg.get("head_dim")
    head_dim_in_config = head_dim is not None
    if head_dim is None:
        if hidden % n_heads:
            raise ConversionError(f"config.json: hidden_size ({hidden}) is not a multiple of num_attention_heads ({n_heads}).")
        head_dim = hidden // n_heads
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0:
        raise ConversionError(f"config.json: head_dim has an unexpected value {head_dim!r}.")
    if not _bool(cfg, "rope_3d", True):
        raise ConversionError("config.json sets rope_3d=false; only the 3-D rope of ERNIE 4.5 VL is supported.")

    # rope: rope_theta at the top level; rope_scaling, when saved, only restates the 3-D rope
    theta = _float(cfg, "rope_theta", 10000.0)  # Baidu's Ernie4_5_Config default
    if theta <= 0:
        raise ConversionError(f"config.json: rope_theta has an unexpected value {theta!r}.")
    t_share = _int(cfg, "freq_allocation", 20, minimum=0)
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise ConversionError(f"config.json: rope_scaling has an unexpected value {scaling!r}.")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in (None, "default", "ernie_3d", "mrope", "3d"):
        raise ConversionError(
            f"config.json asks for rope scaling {scaling!r}; the 3-D rope layout of ernie4_5-vl-moe "
            "cannot be scaled (llama.cpp refuses it), so this converter does not write it."
        )
    if "freq_allocation" in scaling and scaling["freq_allocation"] != t_share:
        raise ConversionError(
            f"config.json: rope_scaling.freq_allocation ({scaling['freq_allocation']}) contradicts "
            f"freq_allocation ({t_share})."
        )
    rest = head_dim // 2 - t_share
    if rest < 0 or rest % 2:
        raise ConversionError(
            f"config.json: freq_allocation {t_share} does not split head_dim {head_dim} into equal h and w "
            f"rope sections (head_dim / 2 - freq_allocation = {rest} must be even and not negative)."
        )
    section = (rest // 2, rest // 2, t_share)
    if "mrope_section" in scaling and list(scaling["mrope_section"]) != list(section):
        raise ConversionError(
            f"config.json: rope_scaling.mrope_section {scaling['mrope_section']} contradicts "
            f"freq_allocation {t_share} (which gives {list(section)})."
        )
    gate_act = cfg.get("moe_gate_act", "softmax")
    if gate_act != "softmax":
        raise ConversionError(f"config.json: moe_gate_act {gate_act!r} is not supported (ERNIE 4.5 VL routes with softmax).")

    n = _int(cfg, "num_hidden_layers", minimum=1)
    text = TextConfig(
        vocab_size=_int(cfg, "vocab_size", 32000, minimum=1),
        hidden_size=hidden,
        intermediate_size=_int(cfg, "intermediate_size", minimum=1),
        n_layers=n,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        head_dim_in_config=head_dim_in_config,
        max_position_embeddings=_int(cfg, "max_position_embeddings", 32768, minimum=1),
        rms_norm_eps=_float(cfg, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=None,
        tie_word_embeddings=_bool(cfg, "tie_word_embeddings", False),
        use_bias=_bool(cfg, "use_bias", False),
        mrope_section=section,
    )

    # MoE layers: (i + 1) % interval == 0 and min(start) <= i <= max(end), as transformers' conversion
    # and Baidu's code build them; with per-modality lists each pool exists only in its own range
    n_text, n_vision = _int_pair(cfg, "moe_num_experts", 0)
    if n_text < 1 or n_vision < 1:
        raise ConversionError(f"config.json: moe_num_experts {cfg.get('moe_num_experts')!r} leaves no text or vision experts.")
    ff_text, ff_vision = _int_pair(cfg, "moe_intermediate_size", 0)
    interval = _int(cfg, "moe_layer_interval", 2, minimum=1)
    starts = _int_list(cfg, "moe_layer_start_index", 0)
    ends = [n - 1 if e == -1 else e for e in _int_list(cfg, "moe_layer_end_index", -1)]
    if len(starts) != len(ends) and 1 in (len(starts), len(ends)):
        starts, ends = starts * (len(ends) if len(starts) == 1 else 1), ends * (len(starts) if len(ends) == 1 else 1)
    if len(starts) != len(ends) or len(starts) > 2:
        raise ConversionError(
            f"config.json: moe_layer_start_index {cfg.get('moe_layer_start_index')!r} and moe_layer_end_index "
            f"{cfg.get('moe_layer_end_index')!r} should be integers or [text, vision] pairs."
        )
    ranges = [(s, min(e, n - 1)) for s, e in zip(starts, ends)]
    per_pool = {tuple(i for i in range(n) if (i + 1) % interval == 0 and s <= i <= e) for s, e in ranges}
    if len(per_pool) > 1:
        raise ConversionError(
            f"config.json: moe_layer_start_index {cfg.get('moe_layer_start_index')!r} / moe_layer_end_index "
            f"{cfg.get('moe_layer_end_index')!r} give the text and vision experts different layers; "
            "llama.cpp's ernie4_5-vl-moe has both pools in every MoE layer."
        )
    lo, hi = min(starts), max(ends)
    layers = tuple(i for i in range(n) if (i + 1) % interval == 0 and lo <= i <= hi)
    text.moe = MoeConfig(
        n_experts=n_text,
        top_k=_int(cfg, "moe_k", 2, minimum=1),
        n_shared=_int(cfg, "moe_num_shared_experts", 0),
        expert_ff=ff_text,
        layer_start=lo,
        layer_end=min(hi, n - 1),
        layer_interval=interval,
        n_experts_vl=n_vision,
        expert_ff_vl=ff_vision,
        layers=layers,
    )
    _vl_checks(text, cfg.get("hidden_act"))
    extra: dict[str, Any] = {"format": "baidu"}
    for key, default in _VL_TOKEN_DEFAULTS.items():
        extra[key] = _int(raw, "im_patch_id" if key == "image_token_id" else key, default)
    vision = raw.get("vision_config") or {}
    if isinstance(vision, dict):
        width = vision.get("embed_dim")  # Baidu's vision "hidden_size" is not the ViT width
        ratio = vision.get("mlp_ratio")
        extra["vision"] = {
            "depth": vision.get("depth"), "hidden_size": width,
            "intermediate_size": int(width * ratio) if isinstance(width, int) and isinstance(ratio, (int, float)) else None,
            "num_heads": vision.get("num_heads"), "patch_size": vision.get("patch_size"),
            "spatial_merge_size": vision.get("spatial_merge_size"),
            "temporal_merge_size": raw.get("temporal_conv_size"),
        }
    return text, extra


def _parse_ernie4_5_vl(raw: dict[str, Any]) -> tuple[TextConfig, dict[str, Any]]:
    if "text_config" in raw:
        return _parse_vl_hf(raw)
    return _parse_vl_baidu(raw)


# architectures[0] -> parser. Baidu's remote code calls the dense model "Ernie4_5_ForCausalLM".
# A parser returns a TextConfig, or (TextConfig, extra) for HFConfig.extra.
_PARSERS: dict[str, Callable[[dict[str, Any]], TextConfig | tuple[TextConfig, dict[str, Any]]]] = {
    "Ernie4_5ForCausalLM": _parse_ernie4_5,
    "Ernie4_5_ForCausalLM": _parse_ernie4_5,
    "Ernie4_5_MoeForCausalLM": _parse_ernie4_5_moe,
    VL_ARCHITECTURE: _parse_ernie4_5_vl,
}
# config.json without "architectures": guess from model_type (HF-native and Baidu's VL names)
_MODEL_TYPES = {
    "ernie4_5": "Ernie4_5ForCausalLM",
    "ernie4_5_moe": "Ernie4_5_MoeForCausalLM",
    "ernie4_5_vl_moe": VL_ARCHITECTURE,
    "ernie4_5_moe_vl": VL_ARCHITECTURE,
}

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
    parsed = parser(raw)
    text, extra = parsed if isinstance(parsed, tuple) else (parsed, {})
    return HFConfig(path=path or Path("config.json"), architecture=arch, raw=raw, text=text, extra=extra)


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


# -- ERNIE 4.5 VL: the vision tower and the resampler ------------------------------------------

@dataclass
class VisionConfig:
    """The ViT and resampler of ERNIE 4.5 VL, normalised from either config format.

    HF-native names (``vision_config``) first; Baidu's original names in brackets.
    """

    depth: int  # depth [vision_config.depth]
    hidden_size: int  # ViT width: hidden_size [vision_config.embed_dim; its hidden_size is not the ViT width]
    intermediate_size: int  # ViT MLP width: intermediate_size [embed_dim * mlp_ratio]
    n_heads: int  # num_heads [vision_config.num_heads]
    patch_size: int  # patch_size [vision_config.patch_size]
    in_channels: int  # in_channels [vision_config.in_channels]
    spatial_merge_size: int  # spatial_merge_size [vision_config.spatial_merge_size and top-level spatial_conv_size]
    temporal_merge_size: int  # temporal_merge_size [top-level temporal_conv_size]
    hidden_act: str  # the ViT MLP's activation: hidden_act [vision_config.hidden_act]
    layer_norm_eps: float  # rms_norm_eps (used by the ViT's and the resampler's LayerNorms) [1e-6]
    use_temporal_conv: bool = True  # [top-level use_temporal_conv]; HF-native models always have it


# Baidu's remote-code vision config class (Qwen2-VL's) and resampler defaults
_BAIDU_VISION_DEFAULTS: dict[str, Any] = {
    "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_channels": 3, "patch_size": 14,
    "spatial_merge_size": 2, "hidden_act": "quick_gelu",
}
# transformers' Ernie4_5_VLMoeVisionConfig defaults
_HF_VISION_DEFAULTS: dict[str, Any] = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 4 * 1280, "num_heads": 16, "in_channels": 3,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_merge_size": 2, "hidden_act": "quick_gelu",
    "rms_norm_eps": 1e-6,
}


def _vision_value(cfg: dict[str, Any], key: str, default: Any) -> Any:
    val = cfg.get(key)
    return default if val is None else val


def _vision_int(cfg: dict[str, Any], key: str, default: int, where: str) -> int:
    val = _vision_value(cfg, key, default)
    if isinstance(val, list) and len(val) == 2 and val[0] == val[1]:
        val = val[0]  # a square patch_size given as [14, 14]
    if not isinstance(val, int) or isinstance(val, bool) or val < 1:
        raise ConversionError(f"config.json: {where}{key!r} should be a positive integer, not {val!r}.")
    return val


def _vision_float(cfg: dict[str, Any], key: str, default: float, where: str) -> float:
    val = _vision_value(cfg, key, default)
    if not isinstance(val, (int, float)) or isinstance(val, bool) or not val > 0:
        raise ConversionError(f"config.json: {where}{key!r} should be a positive number, not {val!r}.")
    return float(val)


def load_vision_config(hf: HFConfig) -> VisionConfig:
    """The vision tower and resampler of an ERNIE 4.5 VL config (either format); ConversionError
    for a text-only model or an unreadable vision section."""
    if hf.architecture != VL_ARCHITECTURE:
        raise ConversionError(
            f"{hf.path} describes a text-only model ({hf.architecture}); it has no vision tower, "
            "so there is no mmproj to write."
        )
    raw = hf.raw
    vision = raw.get("vision_config")
    if vision is None:
        vision = {}
    if not isinstance(vision, dict):
        raise ConversionError("config.json: vision_config is not a JSON object.")
    w = "vision_config."
    if hf.extra.get("format") == "baidu":
        d = _BAIDU_VISION_DEFAULTS
        width = _vision_int(vision, "embed_dim", d["embed_dim"], w)
        ratio = _vision_float(vision, "mlp_ratio", d["mlp_ratio"], w)
        merge = _vision_int(vision, "spatial_merge_size", d["spatial_merge_size"], w)
        conv = _vision_int(raw, "spatial_conv_size", merge, "")
        if conv != merge:
            raise ConversionError(
                f"config.json: spatial_conv_size ({conv}, the resampler's) contradicts "
                f"vision_config.spatial_merge_size ({merge}, the vision tower's)."
            )
        pixel_hidden = _vision_int(raw, "pixel_hidden_size", width, "")
        if pixel_hidden != width:
            raise ConversionError(
                f"config.json: pixel_hidden_size ({pixel_hidden}) contradicts vision_config.embed_dim ({width})."
            )
        use_temporal = raw.get("use_temporal_conv", True)
        if not isinstance(use_temporal, bool):
            raise ConversionError(f"config.json: 'use_temporal_conv' should be true or false, not {use_temporal!r}.")
        eps_key = "rms_norm_eps" if vision.get("rms_norm_eps") is not None else "layer_norm_eps"
        return VisionConfig(
            depth=_vision_int(vision, "depth", d["depth"], w),
            hidden_size=width,
            intermediate_size=int(width * ratio),
            n_heads=_vision_int(vision, "num_heads", d["num_heads"], w),
            patch_size=_vision_int(vision, "patch_size", d["patch_size"], w),
            in_channels=_vision_int(vision, "in_channels", d["in_channels"], w),
            spatial_merge_size=merge,
            temporal_merge_size=_vision_int(raw, "temporal_conv_size", 2, ""),
            hidden_act=str(_vision_value(vision, "hidden_act", d["hidden_act"])),
            layer_norm_eps=_vision_float(vision, eps_key, 1e-6, w),  # Baidu's LayerNorms use 1e-6
            use_temporal_conv=use_temporal,
        )
    d = _HF_VISION_DEFAULTS
    return VisionConfig(
        depth=_vision_int(vision, "depth", d["depth"], w),
        hidden_size=_vision_int(vision, "hidden_size", d["hidden_size"], w),
        intermediate_size=_vision_int(vision, "intermediate_size", d["intermediate_size"], w),
        n_heads=_vision_int(vision, "num_heads", d["num_heads"], w),
        patch_size=_vision_int(vision, "patch_size", d["patch_size"], w),
        in_channels=_vision_int(vision, "in_channels", d["in_channels"], w),
        spatial_merge_size=_vision_int(vision, "spatial_merge_size", d["spatial_merge_size"], w),
        temporal_merge_size=_vision_int(vision, "temporal_merge_size", d["temporal_merge_size"], w),
        hidden_act=str(_vision_value(vision, "hidden_act", d["hidden_act"])),
        layer_norm_eps=_vision_float(vision, "rms_norm_eps", d["rms_norm_eps"], w),
    )
