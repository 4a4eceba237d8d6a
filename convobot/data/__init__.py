"""Data: instruction rows in, examples out.

    load.py            rows from the hub, a local .json/.jsonl/.csv/.parquet file or the bundled tasks, validated
                       by file, row and field; the seeded held-out split
    conversations.py   OpenAI `messages` and ShareGPT `conversations` rows, checked turn by turn, in one shape
    preferences.py     preference rows (chosen / rejected, or labelled answers) in TRL's, Alpaca and ShareGPT shapes,
                       and what each preference or reward stage's trainer takes
    tasks.py           the bundled offline tasks (checkable answers) and exact match
    examples.py        rows -> prompt/completion pairs or conversations, cut to the context; `prepare` does it all
                       (`prepare_stage` for a preference or reward stage)
"""
