"""The tokens at which generation stops: the chat template's end-of-turn markers that are single tokens of the
tokenizer, then its eos. Generation samples up to them; the GGUF export writes the one that ends an answer."""

from __future__ import annotations

from typing import Any

from sftlab.data.templates import ChatTemplate


def stop_token_ids(tokenizer: Any, template: ChatTemplate) -> list[int]:
    """Ids of the template's end-of-turn markers that are single tokens of the tokenizer, then its eos.

    A marker the tokenizer splits into several tokens cannot be matched by a per-token check and is left
    out (its eos, if any, still stops generation)."""
    ids: list[int] = []
    for marker in template.end_of_turn:
        encoded = tokenizer.encode(marker, add_special_tokens=False)
        # Also require the id to *be* the marker: a byte-level BPE could merge a marker's characters into
        # one ordinary token that merely decodes to the same text.
        if len(encoded) == 1 and tokenizer.convert_ids_to_tokens(encoded[0]) == marker:
            ids.append(int(encoded[0]))
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.append(eos)
    return list(dict.fromkeys(ids))
