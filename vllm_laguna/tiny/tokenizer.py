"""A small byte-level BPE tokenizer with Laguna's special tokens, trained on the fly.

Ids 0..31 are added tokens laid out as in poolside/Laguna-XS.2 (``〈|EOS|〉``=2 is BOS and
EOS, ``<think>``=18, ``</think>``=19, ``<assistant>``=23, ``</assistant>``=24, ``<tool_call>``
and ``</tool_call>`` single tokens); ``<arg_key>``, ``<arg_value>``, ``<system>``, ``<user>``,
``<tool_response>`` are plain text and so span several tokens, as in the real tokenizer.
Training is deterministic: the same corpus and size always give the same vocabulary.

Which added tokens are *special* (dropped by ``decode(..., skip_special_tokens=True)``, vLLM's
default): ``〈|EOS|〉``, ``<assistant>``, ``</assistant>``, padding and the reserved fillers
always. ``<think>``, ``</think>``, ``<tool_call>``, ``</tool_call>`` are plain added tokens by
default, as most plausibly in XS.2 (vLLM's in-tree Poolside parsers read them from text
decoded with the default flags, and note that they "are not marked as special");
``special_markers=True`` makes them special, the harder case for the parsers, which then
have to ask for ``skip_special_tokens=False`` themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vllm_laguna.laguna_format import ASSISTANT, END_ASSISTANT, END_THINK, END_TOOL_CALL, EOS, THINK, TOOL_CALL

#: id -> token for the ids XS.2 fixes; the remaining ids below 32 are reserved fillers.
SPECIAL_IDS = {
    0: "<|pad|>",
    1: "<|unk|>",
    2: EOS,
    18: THINK,
    19: END_THINK,
    20: TOOL_CALL,
    21: END_TOOL_CALL,
    23: ASSISTANT,
    24: END_ASSISTANT,
}
NUM_SPECIAL = 32

CHAT_TEMPLATE = (Path(__file__).with_name("chat_template.jinja")).read_text()
#: the template line that makes thinking off unless the request turns it on (XS.2's default)
_THINKING_OFF_BY_DEFAULT = "enable_thinking if enable_thinking is defined else false"
assert _THINKING_OFF_BY_DEFAULT in CHAT_TEMPLATE


def chat_template(thinking_by_default: bool = False) -> str:
    """The XS.2 chat template; ``thinking_by_default`` opens the reasoning unless the request
    says ``enable_thinking=False``, as Laguna S-2.1's template does."""
    if not thinking_by_default:
        return CHAT_TEMPLATE
    return CHAT_TEMPLATE.replace(_THINKING_OFF_BY_DEFAULT, _THINKING_OFF_BY_DEFAULT.removesuffix("false") + "true")

_CORPUS = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
def main():\n    print("hello, world")\n    return 0\n
The capital of France is Paris. The weather in Paris is sunny today, 21 degrees.
<system> <user> <tool_response> <arg_key>city</arg_key> <arg_value>Paris</arg_value>
{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 -2 true false null [1, 2, 3]
Reasoning: first, check the inputs; then call the tool; finally, answer the question.
SELECT name FROM users WHERE id = 42; for i in range(10): x += i * 2
Ünïcödé → λ, 東京, naïve café, emoji 🙂 and tabs\tand\nnewlines.
"""


def special_tokens() -> list[str]:
    return [SPECIAL_IDS.get(i, f"<|reserved_{i}|>") for i in range(NUM_SPECIAL)]


#: added tokens that are special only with ``special_markers=True``
MARKERS = (THINK, END_THINK, TOOL_CALL, END_TOOL_CALL)


def build_tokenizer(
    out_dir: str | Path,
    vocab_size: int = 512,
    *,
    special_markers: bool = False,
    extra_tokens: Sequence[str] = (),
    thinking_by_default: bool = False,
) -> int:
    """Train and save the tokenizer (``tokenizer.json`` + config with the chat template).

    ``extra_tokens`` are appended as plain added tokens (ids from the trained vocabulary's
    size on), e.g. the pieces of a scripted checkpoint. ``thinking_by_default``: see
    :func:`chat_template`. Returns the tokenizer's length,
    which the model's vocabulary must cover.
    """
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    for token_id, token in SPECIAL_IDS.items():
        assert tok.token_to_id(token) == token_id, (token, tok.token_to_id(token))
    if not special_markers:  # the trainer adds every reserved token as special
        spec = json.loads(tok.to_str())
        for added in spec["added_tokens"]:
            if added["content"] in MARKERS:
                added["special"] = False
        tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in extra_tokens])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=SPECIAL_IDS[0],
        unk_token=SPECIAL_IDS[1],
        additional_special_tokens=[ASSISTANT, END_ASSISTANT, *(MARKERS if special_markers else ())],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat_template(thinking_by_default)
    fast.save_pretrained(str(out_dir))
    return len(fast)
