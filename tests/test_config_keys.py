"""Every config key is read, refused or known not to matter; any other key gets one warning.

The published configs' keys (as the config-key audit found them in copies of the Hub files:
README, Config keys) load without a warning, so do this package's tiny checkpoints, and
each parser reads only keys its lists name. A key nobody has heard of is named in exactly
one warning, however often the config is parsed.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
from transformers import AutoConfig

from vllm_laguna.configs import keys as config_keys
from vllm_laguna.configs import laguna, lfm2, llama4
from vllm_laguna.tiny.laguna import build_laguna
from vllm_laguna.tiny.lfm2 import build_lfm2
from vllm_laguna.tiny.llama4 import build_llama4

#: keys of the published configs (Laguna-XS.2 / XS-2.1 / S-2.1 / M.1, the LFM2 releases in
#: both forms, Llama-4-Scout/Maverick's text_config), from the audit's copies of the files
PUBLISHED_KEYS = {
    "Laguna": [
        "architectures", "attention_bias", "attention_dropout", "bos_token_id", "decoder_sparse_step",
        "eos_token_id", "gating", "gating_types", "head_dim", "hidden_act", "hidden_size",
        "intermediate_size", "layer_types", "max_position_embeddings", "mlp_layer_types", "mlp_only_layers",
        "model_type", "moe_apply_router_weight_on_input", "moe_intermediate_size", "moe_routed_scaling_factor",
        "moe_router_logit_softcapping", "norm_topk_prob", "num_attention_heads", "num_attention_heads_per_layer",
        "num_experts", "num_experts_per_tok", "num_hidden_layers", "num_key_value_heads", "pad_token_id",
        "partial_rotary_factor", "qkv_bias", "quantization_config", "rms_norm_eps", "rope_parameters",
        "rope_scaling", "rope_theta", "shared_expert_intermediate_size", "sliding_window",
        "swa_attention_sink_enabled", "swa_rope_parameters", "tie_word_embeddings", "torch_dtype", "use_cache",
        "transformers_version", "moe_router_score_func",
    ],
    "LFM2": [
        "architectures", "block_auto_adjust_ff_dim", "block_dim", "block_ff_dim", "block_ffn_dim_multiplier",
        "block_mlp_init_scale", "block_multiple_of", "block_norm_eps", "block_out_init_scale", "block_use_swiglu",
        "block_use_xavier_init", "bos_token_id", "conv_L_cache", "conv_bias", "conv_dim", "conv_dim_out",
        "conv_use_xavier_init", "dtype", "eos_token_id", "full_attn_idxs", "hidden_size", "initializer_range",
        "intermediate_size", "layer_types", "max_position_embeddings", "model_type", "norm_eps",
        "num_attention_heads", "num_heads", "num_hidden_layers", "num_key_value_heads", "pad_token_id",
        "rope_parameters", "rope_theta", "tie_embedding", "tie_word_embeddings", "torch_dtype", "use_cache",
        "use_pos_enc", "vocab_size",
    ],
    "Llama4": [
        "attention_bias", "attention_chunk_size", "attention_dropout", "attn_scale", "attn_temperature_tuning",
        "bos_token_id", "eos_token_id", "floor_scale", "for_llm_compressor", "head_dim", "hidden_act",
        "hidden_size", "initializer_range", "interleave_moe_layer_step", "intermediate_size",
        "intermediate_size_mlp", "max_position_embeddings", "model_type", "moe_layers", "no_rope_layer_interval",
        "no_rope_layers", "num_attention_heads", "num_experts_per_tok", "num_hidden_layers",
        "num_key_value_heads", "num_local_experts", "output_router_logits", "pad_token_id", "rms_norm_eps",
        "rope_scaling", "rope_theta", "router_aux_loss_coef", "router_jitter_noise", "torch_dtype", "use_cache",
        "use_qk_norm", "vocab_size",
    ],
}  # fmt: skip
KNOWN = {
    "Laguna": laguna.READ_KEYS | laguna.IGNORED_KEYS,
    "LFM2": lfm2.READ_KEYS | lfm2.IGNORED_KEYS,
    "Llama4": llama4.READ_KEYS | llama4.IGNORED_KEYS,
}
PARSERS = {"Laguna": laguna.parse_laguna_config, "LFM2": lfm2.parse_lfm2_config, "Llama4": llama4.parse_llama4_config}
BUILDERS = {"Laguna": build_laguna, "LFM2": build_lfm2, "Llama4": build_llama4}


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory):
    """Each model's tiny checkpoint config as transformers loads it (what vLLM hands over)."""
    return {model: AutoConfig.from_pretrained(build(tmp_path_factory.mktemp(model))) for model, build in BUILDERS.items()}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(config_keys, "_warned", set())


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == config_keys.__name__ and r.levelno == logging.WARNING]


@pytest.mark.parametrize("model", list(PUBLISHED_KEYS))
def test_published_config_keys_are_all_known(model):
    config = SimpleNamespace(**dict.fromkeys(PUBLISHED_KEYS[model]))
    assert config_keys.unknown_keys(config, KNOWN[model]) == []


def test_published_drafter_keys_are_all_known():
    """The DFlash drafters' own keys (their config is otherwise a Laguna config)."""
    from vllm_laguna.configs.laguna_dflash import DFLASH_KEYS

    drafter = ["architectures", "dflash_config", "draft_vocab_size", "model_type", "num_experts", "rope_theta"]
    config = SimpleNamespace(**dict.fromkeys(drafter))
    assert config_keys.unknown_keys(config, KNOWN["Laguna"] | DFLASH_KEYS) == []
    assert config_keys.unknown_keys(config, KNOWN["Laguna"]) == ["dflash_config", "draft_vocab_size"]


@pytest.mark.parametrize("model", list(PUBLISHED_KEYS))
def test_tiny_checkpoints_load_without_a_warning(model, tiny_configs, caplog):
    PARSERS[model](tiny_configs[model])
    assert _warnings(caplog) == []


@pytest.mark.parametrize("model", list(PUBLISHED_KEYS))
def test_a_key_nobody_knows_gets_one_warning_naming_it(model, tiny_configs, caplog):
    config = tiny_configs[model]
    config.moe_expert_temperature = 0.7  # as transformers keeps a config.json key it does not know
    try:
        for _ in range(3):  # the model, its layers and the start-up checks each parse the config
            PARSERS[model](config)
    finally:
        del config.moe_expert_temperature
    (warning,) = _warnings(caplog)
    assert "`moe_expert_temperature`" in warning and "not read" in warning
    assert warning.startswith(f"{model} config.json has keys")


@pytest.mark.parametrize("model", list(PUBLISHED_KEYS))
def test_parsers_read_only_keys_they_list(model, tiny_configs):
    """A key a parser reads but does not list would be warned about as unknown."""
    read = set()

    class Recording(SimpleNamespace):
        def __getattribute__(self, name):
            read.add(name)
            return super().__getattribute__(name)

    raw = json.loads(tiny_configs[model].to_json_string())
    PARSERS[model](Recording(**raw))
    listed = KNOWN[model] | {"text_config"}  # Llama 4 looks for a multimodal config's text_config
    assert {key for key in read if not key.startswith("_")} - listed == set()


def test_multimodal_llama4_checks_both_levels(tmp_path, caplog):
    config = AutoConfig.from_pretrained(build_llama4(tmp_path / "mm", layout="multimodal"))
    llama4.parse_llama4_config(config)
    assert _warnings(caplog) == []
    config.text_config.vision_router_bias = 1.0
    config.projector_scale = 2.0
    llama4.parse_llama4_config(config)
    top, text = sorted(_warnings(caplog))
    assert "Llama4 config.json has keys" in top and "`projector_scale`" in top
    assert "config.json text_config has keys" in text and "`vision_router_bias`" in text
