"""An Ollama Modelfile for an exported GGUF: FROM the file, a TEMPLATE that renders what the chat template
renders, the end-of-turn marker as a stop parameter, and the template's default system message as SYSTEM.

Ollama templates are Go templates, not Jinja, so the chat template is not translated; it is measured.
Rendering conversations whose contents are placeholder words shows what the template wraps around each
role's message (`Pieces`); the Go template writes those same wrappers. Templates whose wrapping depends on
more than the role (tool calls, per-message conditions) give no Pieces, and the Modelfile then has no
TEMPLATE: Ollama falls back to the chat template stored in the GGUF file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SYSTEM, USER, ASSISTANT = "SftlabSystemText", "SftlabUserText", "SftlabAnswerText"


@dataclass(frozen=True)
class Pieces:
    start: str
    """Text before the first message (e.g. <|begin_of_text|>)."""
    before: dict[str, str]
    """Per role: the text before its content."""
    after: dict[str, str]
    """Per role: the text after its content (through the end-of-turn marker and its newline)."""
    generation: str
    """The text that opens the assistant's reply (the generation prompt)."""
    default_system: str | None
    """The system message the template inserts when the conversation has none."""

    def render(self, messages: list[dict[str, str]]) -> str:
        """What the Go template renders for `messages` (the generation prompt appended)."""
        body = "".join(self.before[m["role"]] + m["content"] + self.after[m["role"]] for m in messages)
        return self.start + body + self.generation


def chat_pieces(template: Any) -> Pieces | None:
    """The wrappers of each role in `template` (a ChatTemplate), or None when they cannot be measured."""
    try:
        full = template.render_text([{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
                                     {"role": "assistant", "content": ASSISTANT}])
        opened = template.render_text([{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
                                      add_generation_prompt=True)
        bare = template.render_text([{"role": "user", "content": USER}], add_generation_prompt=True)
    except Exception:  # broad on purpose: a template that refuses these conversations simply gets no Pieces
        return None
    if not all(full.count(word) == 1 for word in (SYSTEM, USER, ASSISTANT)):
        return None
    head, rest = full.split(SYSTEM)
    system_to_user, rest = rest.split(USER)
    user_to_answer, tail = rest.split(ASSISTANT)
    after_system, before_user = _split_turn(system_to_user, template.end_of_turn)
    after_user, before_answer = _split_turn(user_to_answer, template.end_of_turn)
    if after_system is None or after_user is None or not opened.startswith(full.split(USER)[0] + USER + after_user):
        return None
    generation = opened[len(full.split(USER)[0] + USER + after_user):]
    before_system = before_user.replace("user", "system")
    if not head.endswith(before_system):
        return None
    start = head[:len(head) - len(before_system)]
    pieces = Pieces(start, {"system": before_system, "user": before_user, "assistant": before_answer},
                    {"system": after_system, "user": after_user, "assistant": tail}, generation, None)
    default = _default_system(bare, pieces)
    if default is False:
        return None
    pieces = Pieces(pieces.start, pieces.before, pieces.after, pieces.generation, default or None)
    check = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    return pieces if pieces.render(check) == opened else None


def _split_turn(text: str, markers: tuple[str, ...]) -> tuple[str | None, str]:
    """`text` between two messages as (the end of the first, the start of the second): split after the
    end-of-turn marker and the newlines that follow it."""
    for marker in markers:
        at = text.find(marker)
        if at >= 0:
            end = at + len(marker)
            while end < len(text) and text[end] == "\n":
                end += 1
            return text[:end], text[end:]
    return None, text


def _default_system(bare: str, pieces: Pieces) -> str | bool:
    """The default system message in a render without one: "" when there is none, False when the render
    is not one the pieces explain."""
    plain = pieces.render([{"role": "user", "content": USER}])
    if bare == plain:
        return ""
    head = pieces.start + pieces.before["system"]
    tail = pieces.after["system"] + pieces.before["user"] + USER + pieces.after["user"] + pieces.generation
    if bare.startswith(head) and bare.endswith(tail) and len(bare) > len(head) + len(tail):
        return bare[len(head):len(bare) - len(tail)]
    return False


def modelfile(gguf_name: str, template: Any, stop: str) -> str:
    """The Modelfile text for the GGUF file `gguf_name` (beside it), stopping at `stop`."""
    lines = [f"FROM ./{gguf_name}"]
    pieces = chat_pieces(template)
    if pieces is not None:
        lines.append(f'TEMPLATE """{_go_template(pieces)}"""')
        if pieces.default_system:
            lines.append(f'SYSTEM """{pieces.default_system}"""')
    lines.append(f"PARAMETER stop {_quoted(stop)}")
    return "\n".join(lines) + "\n"


def _go_template(pieces: Pieces) -> str:
    def role(name: str, keyword: str) -> str:
        return f'{{{{ {keyword} eq .Role "{name}" }}}}{pieces.before[name]}{{{{ .Content }}}}{pieces.after[name]}'

    return (f"{pieces.start}{{{{ range .Messages }}}}{role('system', 'if')}{role('user', 'else if')}"
            f"{role('assistant', 'else if')}{{{{ end }}}}{{{{ end }}}}{pieces.generation}")


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
