from convobot.template import format_example, format_prompt


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
