import itertools

import pytest

from jaxspec.training import chat

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}

# SmolLM2-135M-Instruct's template, as its checkpoint ships it.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3 style: BOS written by the template, header tokens, trimmed content, whitespace control.
LLAMA3_STYLE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# Gemma style: alternation enforced with raise_exception, a namespace, loop controls, the generation tag,
# tojson, and lstrip/trim_blocks doing the layout.
STRICT = """{{ bos_token }}
{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% if (message['role'] == 'user') != (ns.turns % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
    <start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}
    {% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] | trim }}{% endgeneration %}<end_of_turn>
    {% else %}
{{ message['content'] | trim }}<end_of_turn>
    {% endif %}
{% endfor %}
{% if 'meta' in messages[-1] %}{{ messages[-1]['meta'] | tojson }}{% endif %}
{% if add_generation_prompt %}<start_of_turn>model
{% endif %}"""

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Translate 'chat' to English."}, {"role": "assistant", "content": " cat "},
     {"role": "user", "content": "And <b>café</b> ✓?", "meta": {"lang": "fr", "tags": ["<x>", "é"]}},],
    [{"role": "user", "content": "Hi", "name": None}],  # keys holding None are dropped, as transformers does
]


@pytest.fixture(scope="module")
def reference():
    words = ["<unk>", "<s>", "</s>", "<pad>", "hello"]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIALS)


@pytest.mark.parametrize("template", [SMOLLM2, LLAMA3_STYLE, STRICT], ids=["smollm2", "llama3", "strict"])
def test_rendering_matches_transformers(reference, template):
    assert reference.special_tokens_map == SPECIALS
    for messages, generation_prompt in itertools.product(CHATS, (True, False)):
        expected = reference.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        got = chat.render_chat(template, messages, add_generation_prompt=generation_prompt, special_tokens=SPECIALS)
        assert got == expected


def test_template_variables_and_messages_are_left_untouched(reference):
    template = "{{ greeting }} {{ eos_token }} {{ messages | length }}{{ messages[0].get('name', '-') }}"
    messages = [{"role": "user", "content": "x", "name": None}]
    got = chat.render_chat(template, messages, special_tokens=SPECIALS, greeting="hey", eos_token="<end>")
    assert got == reference.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                greeting="hey", eos_token="<end>") == "hey <end> 1-"
    assert messages == [{"role": "user", "content": "x", "name": None}]


def test_a_template_that_raises_gives_its_message(reference):
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="roles must alternate"):
        reference.apply_chat_template(messages, chat_template=STRICT, tokenize=False)
    with pytest.raises(ValueError, match="chat template raised an error: Conversation roles must alternate"):
        chat.render_chat(STRICT, messages, special_tokens=SPECIALS)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",  # transformers' sandbox renders this one as ''; here every unsafe access is refused
    "{{ raise_exception.__globals__ }}",
    "{% set ns = namespace(_hidden=1) %}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{% set _ = messages.append({}) %}",
    "{{ 'x' * 100000000 }}",
    "{{ 2 ** 100000 }}",
])
def test_templates_cannot_reach_python_internals_or_exhaust_memory(template):
    with pytest.raises(ValueError, match="chat template refused"):
        chat.render_chat(template, [{"role": "user", "content": "hi"}])


def test_bad_templates_and_messages_raise_clear_errors():
    with pytest.raises(ValueError, match="syntax error at line 2"):
        chat.render_chat("ok\n{% for m in messages %}", [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="chat template failed: TypeError"):
        chat.render_chat("{{ 1 + 'a' }}", [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="messages is empty"):
        chat.render_chat(SMOLLM2, [])
    with pytest.raises(ValueError, match="must be a list"):
        chat.render_chat(SMOLLM2, "hello")
    with pytest.raises(ValueError, match=r"messages\[1\] must be a dict"):
        chat.render_chat(SMOLLM2, [{"role": "user", "content": "a"}, "b"])
    with pytest.raises(ValueError, match=r"messages\[0\]: chat data must be built from .* got a object"):
        chat.render_chat(SMOLLM2, [{"role": "user", "content": object()}])
    with pytest.raises(ValueError, match="must be a string"):
        chat.compile_template(None)
