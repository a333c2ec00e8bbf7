"""A chat template is user code, and it is always sandboxed: every template (a .jinja file, the tokenizer's
own via `auto`, the built-ins) is rendered by one strict jinja2 sandbox, for training (Encoder) and for
generation (`generate.prompt_ids`) alike. A template that reaches for Python internals, changes a value or
runs away (huge ranges, endless recursion, giant values) fails at once with a TemplateError naming the
template and what was refused, and runs no code; ordinary templates are not hindered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import tiny_chat_tokenizer
from sftlab.data.encode import Encoder
from sftlab.data.schema import Conversation, Message
from sftlab.data.templates import MAX_LOOP_STEPS, load_template
from sftlab.errors import DataError, TemplateError
from sftlab.generate import prompt_ids

CHATML_LOOP = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = Conversation((Message("user", "Hi"), Message("assistant", "Hello!")), where="data.jsonl:3")
MESSAGES = [{"role": "user", "content": "Hi"}]

ESCAPES = {  # name: (template expression, what the error names)
    "str class mro subclasses": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "'__class__'"),
    "cycler globals": ("{{ cycler.__init__.__globals__ }}", "'__init__'"),
    "template reference context": ("{{ self._TemplateReference__context }}", "'_TemplateReference__context'"),
    "lipsum globals os.system": ("{{ lipsum.__globals__['os'].system('touch CANARY') }}", "'__globals__'"),
    "attr filter": ("{{ ''|attr('__class__') }}", "'__class__'"),
    "format string field": ("{{ '{0.__class__.__mro__}'.format(messages) }}", "'__class__'"),
    "raise_exception globals": ("{{ raise_exception.__globals__ }}", "'__globals__'"),
    "strftime_now self": ("{{ strftime_now.__self__ }}", "'__self__'"),
    "namespace internals": ("{% set ns = namespace(a=1) %}{{ ns._Namespace__attrs }}", "'_Namespace__attrs'"),
    "list append": ("{% set seen = [] %}{{ seen.append(1) }}", "'append'"),
    "dict update": ("{{ messages[0].update({'role': 'system'}) }}", "'update'"),
    "loop internals": ("{% for m in messages %}{{ loop._iterator }}{% endfor %}", "'_iterator'"),
}
RUNAWAY = {
    "huge range": ("{% for i in range(10**9) %}x{% endfor %}", "loop steps"),
    "range past len()": ("{% for i in range(10**30) %}x{% endfor %}", "loop steps"),
    "nested ranges": ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
                      "loop steps"),
    "endless macro recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
    "endless recursive loop": ("{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
                               "recursed too deeply"),
    "giant string": ("{{ 'x' * 10**9 }}", "'*' would build a value of more than"),
    "giant list": ("{{ (messages * 10**8) | length }}", "'*' would build a value of more than"),
    "giant power": ("{{ 7 ** 1000000000 }}", "'**' would build an integer of more than"),
    "giant center width": ("{{ 'x'|center(10**9) }}", "center filter was asked for a size of 1000000000"),
    "giant indent": ("{{ 'x\ny'|indent(10**9) }}", "indent filter was asked for a size"),
    "giant batch fill": ("{{ messages|batch(10**9, 'x')|list }}", "batch filter was asked for a size"),
    "endless slices": ("{{ messages|slice(10**9)|list }}", "slice filter was asked for a size"),
    "giant %-format width": ("{{ '%999999999d' % 1 }}", "asks for a field of more than"),
    "giant format-filter width": ("{{ '%999999999s'|format('x') }}", "asks for a field of more than"),
    "giant str.format width": ("{{ '{:>999999999}'.format('x') }}", "asks for a field of more than"),
}
REFUSED = {**{k: (*v, True) for k, v in ESCAPES.items()}, **{k: (*v, False) for k, v in RUNAWAY.items()}}


def _template_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "user_template.jinja"
    path.write_text(CHATML_LOOP + body, encoding="utf-8")
    return path


def _load(how: str, tmp_path: Path, body: str) -> tuple[Any, Any, str]:
    """(template, tokenizer, the name errors give it), loaded as a .jinja file or as the tokenizer's own."""
    tokenizer = tiny_chat_tokenizer()
    if how == "jinja file":
        path = _template_file(tmp_path, body)
        return load_template(str(path), tokenizer), tokenizer, str(path)
    tokenizer.chat_template = CHATML_LOOP + body
    tokenizer.name_or_path = "user/model"
    return load_template("auto", tokenizer), tokenizer, "auto (user/model)"


def _render(path: str, template: Any, tokenizer: Any) -> Any:
    if path == "render_text":
        return template.render_text(MESSAGES)
    if path == "encoder":
        return Encoder(tokenizer, template).encode(CONVERSATION)
    return prompt_ids(tokenizer, template, MESSAGES)  # generate / chat


@pytest.mark.parametrize("render_path", ["render_text", "encoder", "generate prompt"])
@pytest.mark.parametrize("how", ["jinja file", "auto"])
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_escaping_or_runaway_templates_fail_with_a_template_error(tmp_path: Path, case: str, how: str,
                                                                  render_path: str) -> None:
    body, refused, is_escape = REFUSED[case]
    canary = tmp_path / "CANARY"
    template, tokenizer, name = _load(how, tmp_path, body.replace("CANARY", str(canary)))
    for _ in range(2):  # the second time, the sandbox's remembered answers for each (type, attribute) serve
        with pytest.raises(TemplateError) as info:  # not a DataError: every row would hit it, so the run stops
            _render(render_path, template, tokenizer)
        message = str(info.value)
        assert repr(name) in message and refused in message, message
        if is_escape:
            assert "sandbox" in message and "Remove that expression" in message
        assert not canary.exists(), "the template ran code"


LOOKUPS = ("{% for m in messages %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}"
           "{{ loop.revindex }}{{ loop.previtem is defined }}{{ loop.cycle('a', 'b') }}|"
           "{{ m.content.strip().upper() }}{{ m.content.startswith(' ') }}{{ m.content.split('i') | list }}"
           "{{ m.content.replace('H', 'J') }}{{ m.role.title() }}{{ '{}-{}'.format(m.role, 1) }}"
           "{{ '%s!' | format(m.role) }}{{ m.get('name', 'none') }}{{ m.keys() | list }}{{ m.missing is defined }}"
           "{{ messages.index(m) }}{{ messages.count(m) }}{{ m['content'].find('i') }}{{ (1.5).is_integer() }}"
           "{{ loop.changed(m.role) }}{% endfor %}")


def test_attribute_lookups_match_jinja2s_own_sandbox() -> None:
    """sftlab's sandbox takes shortcuts for the lookups chat templates make most (dict keys, loop variables,
    str methods: jinja2's answer remembered per type and name); every answer stays jinja2's, the first time and
    once remembered."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from sftlab.data.templates import ChatTemplate

    messages = [{"role": "user", "content": " Hi there "}, {"role": "assistant", "content": "Hello"}]
    reference = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(LOOKUPS)
    ours = ChatTemplate(LOOKUPS, name="lookups", end_of_turn=("<|im_end|>",))
    expected = reference.render(messages=messages)
    assert "True" in expected and "J" in expected and "user-1" in expected
    assert ours.render_text(messages) == expected
    assert ours.render_text(messages) == expected


def test_the_loop_budget_is_per_render(tmp_path: Path) -> None:
    """Two renders that each loop almost MAX_LOOP_STEPS times both succeed: nothing leaks between renders."""
    steps = MAX_LOOP_STEPS - 10
    template, _, _ = _load("jinja file", tmp_path, f"{{% for i in range({steps}) %}}{{% endfor %}}")
    assert template.render_text(MESSAGES) == template.render_text(MESSAGES)


def test_ordinary_template_features_still_work(tmp_path: Path) -> None:
    body = ("{% set ns = namespace(count=0) %}{% for i in range(messages | length) %}"
            "{% set ns.count = ns.count + 1 %}{% endfor %}"
            "{{ ns.count }}|{{ messages[0]['content'] | trim | tojson }}|{{ messages[0].items() | list | length }}|"
            "{{ '-' * 3 }}|{{ 2 ** 10 }}|{{ strftime_now('%Y') | length }}|"
            "{% generation %}{{ eos_token }}{% endgeneration %}")
    template, tokenizer, _ = _load("jinja file", tmp_path, body)
    text = template.render_text([{"role": "user", "content": " Hi "}])
    assert text.endswith('1|"Hi"|2|---|1024|4|<|endoftext|>')
    assert Encoder(tokenizer, load_template("chatml", tokenizer)).encode(CONVERSATION).input_ids


def test_a_template_refusing_a_row_is_a_data_error_naming_the_row(tmp_path: Path) -> None:
    """raise_exception is how real templates reject a conversation: that row is bad, not the template."""
    body = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come first') }}"
            "{% endif %}")
    template, tokenizer, name = _load("jinja file", tmp_path, body)
    with pytest.raises(DataError) as info:
        Encoder(tokenizer, template).encode(CONVERSATION)
    assert str(info.value).startswith(f"data.jsonl:3: chat template {name!r} refused the conversation: "
                                      "a system message must come first")


def test_a_template_crashing_on_a_row_is_a_data_error_naming_the_template_and_row(tmp_path: Path) -> None:
    template, tokenizer, name = _load("jinja file", tmp_path, "{{ (messages | length) / 0 }}")
    with pytest.raises(DataError) as info:
        Encoder(tokenizer, template).encode(CONVERSATION)
    assert info.value.where == "data.jsonl:3" and info.value.reason == "template failed"
    assert f"chat template {name!r} failed on the conversation with ZeroDivisionError" in str(info.value)


@pytest.mark.parametrize(("content", "fragment"), [
    (b"{{ messages }}\xff\xfe", "invalid UTF-8 at byte 14"),
    (b"{% if %}", "is not valid Jinja"),
    (("{{ " + "(" * 20_000 + "1" + ")" * 20_000 + " }}").encode(), "too deeply to compile"),
])
def test_unusable_template_files_fail_with_a_template_error(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "broken.jinja"
    path.write_bytes(content)
    with pytest.raises(TemplateError, match=fragment):
        load_template(str(path), tiny_chat_tokenizer())
