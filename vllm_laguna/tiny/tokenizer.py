"""A small byte-level BPE tokenizer with Laguna's special tokens, trained on the fly.

Ids 0..31 are special tokens laid out as in poolside/Laguna-XS.2 (``〈|EOS|〉``=2 is BOS and
EOS, ``<think>``=18, ``</think>``=19, ``<assistant>``=23, ``</assistant>``=24, ``<tool_call>``
and ``</tool_call>`` single tokens); ``<arg_key>``, ``<arg_value>``, ``<system>``, ``<user>``,
``<tool_response>`` are plain text and so span several tokens, as in the real tokenizer.
Training is deterministic: the same corpus and size always give the same vocabulary.
"""

from __future__ import annotations

from pathlib import Path

EOS = "〈|EOS|〉"
THINK, END_THINK = "<think>", "</think>"
ASSISTANT, END_ASSISTANT = "<assistant>", "</assistant>"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"

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


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> int:
    """Train and save the tokenizer (``tokenizer.json`` + config with the chat template).

    Returns the tokenizer's length, which the model's vocabulary must cover.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
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

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=SPECIAL_IDS[0],
        unk_token=SPECIAL_IDS[1],
        additional_special_tokens=[THINK, END_THINK, TOOL_CALL, END_TOOL_CALL, ASSISTANT, END_ASSISTANT],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return len(fast)
