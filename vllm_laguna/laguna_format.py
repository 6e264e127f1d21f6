"""The markers of Laguna's chat format (poolside/Laguna-XS.2), shared by the parsers, the
chat template's tests and the tiny tokenizer.

``<think>``, ``</think>``, ``<assistant>``, ``</assistant>``, ``<tool_call>``,
``</tool_call>`` and ``〈|EOS|〉`` are single tokens of the real tokenizer; the argument tags
and the ``<system>``/``<user>``/``<tool_response>`` headers are plain text spanning several
tokens, so a streaming parser sees them split across deltas.
"""

EOS = "〈|EOS|〉"
THINK, END_THINK = "<think>", "</think>"
ASSISTANT, END_ASSISTANT = "<assistant>", "</assistant>"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
ARG_KEY, END_ARG_KEY = "<arg_key>", "</arg_key>"
ARG_VALUE, END_ARG_VALUE = "<arg_value>", "</arg_value>"

#: markers the real tokenizer holds as one token each
SINGLE_TOKEN_MARKERS = (EOS, THINK, END_THINK, ASSISTANT, END_ASSISTANT, TOOL_CALL, END_TOOL_CALL)


def partial_suffix(text: str, *markers: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``markers``:
    the part a streaming parser must hold back until the next delta decides it."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest


def first_of(text: str, *markers: str) -> tuple[int, str] | None:
    """The earliest occurrence of any of ``markers`` in ``text``, as (index, marker)."""
    found = [(i, m) for m in markers if (i := text.find(m)) >= 0]
    return min(found) if found else None
