"""What becomes of assistant reasoning before rendering: `data.reasoning` and `data.reasoning_turns`.

Templates such as Qwen3's render the reasoning of the turns after the last user message only and strip
it from earlier turns. By default (`reasoning_turns: rendered`) a conversation is trained as its template
renders it, those earlier traces absent (`sftlab check` counts them). `split` makes one example per
assistant turn that has reasoning, cut right after that turn, so the template shows the history exactly
as at that turn and renders its reasoning; every assistant turn is trained in exactly one example (the
first that reaches it), so no content is trained twice and no reasoning is lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

from sftlab.data.schema import Conversation
from sftlab.data.templates import ChatTemplate

REASONING = ("keep", "drop")
REASONING_TURNS = ("rendered", "split")


def drop_reasoning(conversation: Conversation) -> Conversation:
    """The conversation without any assistant reasoning (`data.reasoning: drop`)."""
    if all(m.reasoning is None for m in conversation.messages):
        return conversation
    return replace(conversation, messages=tuple(replace(m, reasoning=None) for m in conversation.messages))


def split_reasoning_turns(conversation: Conversation) -> list[Conversation]:
    """One conversation per assistant turn with reasoning (plus one for trailing turns without), each cut
    after its turn; turns trained in an earlier piece are marked `train: false` in the later ones."""
    messages = conversation.messages
    assistants = [i for i, m in enumerate(messages) if m.role == "assistant"]
    cuts = [i for i in assistants if messages[i].reasoning is not None]
    if not cuts:
        return [conversation]
    if cuts[-1] != assistants[-1]:
        cuts.append(assistants[-1])
    pieces, done = [], -1
    for cut in cuts:
        kept = tuple(replace(m, train=False) if m.role == "assistant" and i <= done else m
                     for i, m in enumerate(messages[:cut + 1]))
        pieces.append(replace(conversation, messages=kept))
        done = cut
    return pieces


def prepare(conversations: Iterable[Conversation], template: ChatTemplate, *, reasoning: str = "keep",
            reasoning_turns: str = "rendered") -> Iterator[Conversation]:
    """The conversations as training encodes them under the two settings (inline `<think>` blocks first
    moved to the reasoning field where the template renders reasoning)."""
    for conversation in conversations:
        if reasoning_turns == "split" or reasoning == "drop":
            conversation = template.with_inline_reasoning(conversation)
        if reasoning == "drop":
            yield drop_reasoning(conversation)
        elif reasoning_turns == "split":
            yield from split_reasoning_turns(conversation)
        else:
            yield conversation
