"""Config of a Laguna DFlash drafter (poolside's ``Laguna-*-DFlash``, vLLM architecture
``DFlashLagunaForCausalLM``): read, validate, resolve.

The drafter's ``config.json`` is a Laguna config (``model_type: "laguna"``) for the drafter's
own layers, plus:

* ``dflash_config.target_layer_ids``: the target layers whose output the drafter reads (one
  aux hidden state each, in this order); ``eagle_aux_hidden_state_layer_ids``, when present,
  says the same thing as vLLM's aux-layer ids (``target_layer_ids + 1``: the layer whose
  input is captured), and vLLM reads it first, so the two must agree;
* ``dflash_config.mask_token_id``: the token fed at the masked block positions;
* ``draft_vocab_size``: must equal the target's vocabulary (the drafter shares the target's
  embedding and LM head).

vLLM requires uniform ``layer_types`` (all ``sliding_attention`` in the published drafters);
the drafter MLPs are dense. vLLM hands the model its own ``EAGLEConfig`` wrapping the JSON,
which carries these keys as attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_laguna.configs.errors import ConfigError
from vllm_laguna.configs.laguna import LagunaArch, parse_laguna_config

MODEL = "Laguna DFlash drafter"


@dataclass(frozen=True)
class LagunaDFlashArch:
    """The drafter's layers (a Laguna decoder) and how it reads its target."""

    layers: LagunaArch
    #: target layers whose output (residual stream before the next layer) is read, in order
    target_layer_ids: tuple[int, ...]
    #: width of each aux hidden state (the target's hidden size)
    target_hidden_size: int
    mask_token_id: int


def parse_laguna_dflash_config(
    config: Any, target_num_layers: int, target_vocab_size: int, target_hidden_size: int
) -> LagunaDFlashArch:
    """Validate a drafter config against its target and resolve it.

    Raises:
        ConfigError: naming the offending field and the value expected.
    """
    layers = parse_laguna_config(config)
    if len(set(layers.layer_types)) != 1:
        raise ConfigError(MODEL, "layer_types", "one layer type for every drafter layer", list(layers.layer_types))
    if "sparse" in layers.mlp_layer_types:
        raise ConfigError(
            MODEL, "mlp_layer_types", 'all "dense" (drafter MLPs are dense)', list(layers.mlp_layer_types)
        )

    dflash = getattr(config, "dflash_config", None)
    if not isinstance(dflash, dict):
        raise ConfigError(MODEL, "dflash_config", "a dict with target_layer_ids", dflash)
    ids = dflash.get("target_layer_ids")
    if (
        not isinstance(ids, (list, tuple))
        or not ids
        or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < target_num_layers for i in ids)
    ):
        raise ConfigError(
            MODEL,
            "dflash_config.target_layer_ids",
            f"a non-empty list of target layer indices in [0, {target_num_layers})",
            ids,
        )
    aux_ids = getattr(config, "eagle_aux_hidden_state_layer_ids", None)
    if aux_ids and list(aux_ids) != [i + 1 for i in ids]:
        raise ConfigError(
            MODEL,
            "eagle_aux_hidden_state_layer_ids",
            f"dflash_config.target_layer_ids + 1 = {[i + 1 for i in ids]} (vLLM reads this key first)",
            list(aux_ids),
        )
    if dflash.get("use_aux_hidden_state", True) is not True:
        raise ConfigError(MODEL, "dflash_config.use_aux_hidden_state", "true (the drafter reads the target)", False)

    draft_vocab = getattr(config, "draft_vocab_size", None)
    if draft_vocab != target_vocab_size or layers.vocab_size != target_vocab_size:
        raise ConfigError(
            MODEL,
            "draft_vocab_size",
            f"the target's vocab_size={target_vocab_size} (the drafter shares its embedding and LM head)",
            draft_vocab,
        )
    if layers.hidden_size != target_hidden_size:
        raise ConfigError(
            MODEL,
            "hidden_size",
            f"the target's hidden_size={target_hidden_size} (shared embedding)",
            layers.hidden_size,
        )
    mask = dflash.get("mask_token_id")
    if isinstance(mask, bool) or not isinstance(mask, int) or not 0 <= mask < target_vocab_size:
        raise ConfigError(MODEL, "dflash_config.mask_token_id", f"a token id in [0, {target_vocab_size})", mask)
    return LagunaDFlashArch(
        layers=layers,
        target_layer_ids=tuple(ids),
        target_hidden_size=target_hidden_size,
        mask_token_id=mask,
    )
