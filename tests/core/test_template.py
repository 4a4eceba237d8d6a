"""The Alpaca template, and the chat template that reproduces it from chat messages."""

import pytest
from jinja2.exceptions import TemplateError

from convobot.data.examples import encode_conversation
from convobot.model.tokenizer import load_tokenizer
from convobot.template import INPUT_IN_CONTENT, format_example, format_prompt, render_prompt, user_message


def test_no_input_prompt_is_the_alpaca_template():
    assert format_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )


def test_with_input_prompt_is_the_alpaca_template():
    assert format_prompt("Add.", "2 + 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n"
        "### Input:\n2 + 2\n\n### Response:\n"
    )


def test_blank_input_uses_no_input_variant():
    assert format_prompt("Say hi.", "   ") == format_prompt("Say hi.")


def test_example_is_prompt_completion_pair():
    pair = format_example({"instruction": "Add.", "input": "2 + 2", "output": "4"})
    assert pair["completion"] == "4" and pair["prompt"].endswith("### Response:\n")


# --- the chat template: the same prompt from chat messages

ROWS = [("Say hi.", ""), ("Add.", "2 + 2"), ("Translate to French: « déjà vu »", "{{ not a template }} {% raw %}"),
        ("Explain\n\nthis", "line one\nline two"), ("Blank input.", "   ")]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("bundled")


@pytest.mark.parametrize("instruction,input", ROWS)
def test_chat_template_reproduces_the_training_prompt_byte_for_byte(tokenizer, instruction, input):
    expected = format_prompt(instruction, input)
    assert render_prompt(tokenizer, [user_message(instruction, input)]) == expected
    assert tokenizer.apply_chat_template([{"role": "user", "content": instruction, "input": input}],
                                         add_generation_prompt=True, tokenize=False) == expected
    # Clients that send only role and content write the input into the content.
    content = instruction + (INPUT_IN_CONTENT + input if input.strip() else "")
    assert render_prompt(tokenizer, [{"role": "user", "content": content}]) == expected


def test_multi_turn_conversations_render_as_documented(tokenizer):
    messages = [{"role": "system", "content": "You answer briefly."},
                user_message("Reverse the words.", "a b"), {"role": "assistant", "content": "b a"},
                {"role": "user", "content": "Upper case?"}]
    assert render_prompt(tokenizer, messages) == (
        "You answer briefly.\n\n### Instruction:\nReverse the words.\n\n### Input:\na b\n\n### Response:\nb a"
        "<|endoftext|>\n\n### Instruction:\nUpper case?\n\n### Response:\n")
    without_system = render_prompt(tokenizer, messages[1:])
    assert without_system.startswith(format_prompt("Reverse the words.", "a b"))


def test_eos_ends_each_assistant_turn_and_only_answers_are_marked(tokenizer):
    messages = [user_message("Reverse the words.", "a b"), {"role": "assistant", "content": "b a"},
                {"role": "user", "content": "Again."}, {"role": "assistant", "content": "a b"}]
    ids, mask = encode_conversation(messages, tokenizer)
    marked = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(marked) == "b a<|endoftext|>a b<|endoftext|>"
    assert ids.count(tokenizer.eos_token_id) == 2 and ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("messages", [
    [{"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
])
def test_the_template_refuses_turns_out_of_order(tokenizer, messages):
    with pytest.raises(TemplateError, match="turns alternate user, assistant"):
        render_prompt(tokenizer, messages)


def test_a_release_bundle_carries_the_chat_template(smoke_release):
    from transformers import AutoTokenizer

    assert (smoke_release.release / "chat_template.jinja").is_file()
    bundled = AutoTokenizer.from_pretrained(smoke_release.release)  # as any client loads it
    assert render_prompt(bundled, [user_message("Add.", "2 + 2")]) == format_prompt("Add.", "2 + 2")
