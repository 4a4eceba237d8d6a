"""The Alpaca prompt template, shared by training, scoring and chat, and the chat template that reproduces it.

These strings are the exact ones of the reference run (Stanford Alpaca's template); changing a
character here changes what the model was trained to continue, so chat and eval import them
from this one place.

CHAT_TEMPLATE is the same format as a Jinja chat template: the tokenizer of every run and bundle carries it, so
`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` (transformers pipelines, `transformers serve`,
vLLM, llama.cpp) builds the prompt the model was trained on. For one user turn it equals `format_prompt` byte for
byte. The conversation format it defines:

    [system]     optional first message; its content replaces the Alpaca preamble
    user         "### Instruction:\\n{content}\\n\\n", then "### Input:\\n{input}\\n\\n" when the message has an
                 `input` (the Alpaca input column); a client that sends only role and content writes the content
                 "{instruction}\\n\\n### Input:\\n{input}", which renders the same
    assistant    "### Response:\\n{content}<|endoftext|>", then "\\n\\n" before the next turn

Turns alternate user / assistant, starting with a user turn; EOS ends every assistant turn (the model learnt to
stop there). `{% generation %}` marks what an assistant says, EOS included: the tokens TRL's
`assistant_only_loss` trains on.
"""

from __future__ import annotations

PREAMBLE_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n")
PREAMBLE_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                     "request.\n\n")
PROMPT_WITH_INPUT = PREAMBLE_WITH_INPUT + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = PREAMBLE_NO_INPUT + "### Instruction:\n{instruction}\n\n### Response:\n"
# Clients that send only role and content (OpenAI's API) write an Alpaca input inside the user's content, after the
# instruction: "{instruction}\n\n### Input:\n{input}" renders exactly as the message with an `input`.
INPUT_IN_CONTENT = "\n\n### Input:\n"
ROLES = ("system", "user", "assistant")


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt part: everything up to and including "### Response:\\n"."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def format_example(row: dict) -> dict:
    """An Alpaca row -> the prompt/completion pair SFTTrainer trains on (EOS is added by TRL); a conversation stays
    a conversation (TRL renders it through the chat template)."""
    if "messages" in row:
        return {"messages": row["messages"]}
    return {"prompt": format_prompt(row["instruction"], row.get("input", "")), "completion": row["output"]}


def _jinja_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# The preamble follows the first user turn: with an input, the Alpaca "paired with an input" sentence.
CHAT_TEMPLATE = (
    "{%- set with_input = " + _jinja_string(PREAMBLE_WITH_INPUT) + " -%}\n"
    "{%- set no_input = " + _jinja_string(PREAMBLE_NO_INPUT) + " -%}\n"
    "{%- set turns = messages[1:] if messages and messages[0]['role'] == 'system' else messages -%}\n"
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "{{- messages[0]['content'] + '\\n\\n' -}}\n"
    "{%- elif turns and ((turns[0].get('input') and turns[0]['input'].strip()) or "
    + _jinja_string(INPUT_IN_CONTENT) + " in turns[0]['content']) -%}\n"
    "{{- with_input -}}\n"
    "{%- else -%}\n"
    "{{- no_input -}}\n"
    "{%- endif -%}\n"
    "{%- for message in turns -%}\n"
    "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}\n"
    "{{- raise_exception('turn ' ~ loop.index ~ ' is ' ~ message['role'] ~ ': after an optional system message, turns "
    "alternate user, assistant, user, ...') -}}\n"
    "{%- endif -%}\n"
    "{%- if message['role'] == 'user' -%}\n"
    "{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}\n"
    "{%- if message.get('input') and message['input'].strip() -%}\n"
    "{{- '### Input:\\n' + message['input'] + '\\n\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- else -%}\n"
    "{{- '### Response:\\n' -}}\n"
    "{%- generation -%}\n"
    "{{- message['content'] + eos_token -}}\n"
    "{%- endgeneration -%}\n"
    "{%- if not loop.last -%}{{- '\\n\\n' -}}{%- endif -%}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
)


def with_chat_template(tokenizer):
    """`tokenizer` with convobot's chat template (a trained model's prompt format is convobot's, whatever the base)."""
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def user_message(instruction: str, input: str = "") -> dict:
    message = {"role": "user", "content": instruction}
    return message | {"input": input} if input and input.strip() else message


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text for the assistant's next turn after `messages`."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_of(row: dict, tokenizer) -> str:
    """The prompt a row's answer follows: the Alpaca prompt, or a conversation up to its last assistant turn. A row
    may also be an example (format_example's prompt/completion pair)."""
    if "messages" in row:
        return render_prompt(tokenizer, row["messages"][:-1])
    if "prompt" in row:
        return row["prompt"]
    return format_prompt(row["instruction"], row.get("input", ""))


def answer_of(row: dict) -> str:
    """The reference answer of a row (or example): its output, or a conversation's last assistant turn."""
    if "messages" in row:
        return row["messages"][-1]["content"]
    return row["completion"] if "completion" in row else row["output"]
