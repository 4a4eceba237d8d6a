"""Serving: talking to a trained model.

    chat.py           `convobot chat`: one answer, or a multi-turn REPL, streamed
    streaming.py      an answer as text pieces while generate() runs (chat)
    server.py         `convobot serve`: the OpenAI-compatible HTTP API, its guards, start-up
    api.py            the API's request and response bodies, as OpenAI's clients send and read them
    models.py         what a server serves: bundles, runs, adapters grouped on one copy of their base
    engine.py         continuous batching: the scheduler every served base model runs in a thread
    sampling.py       per-sequence token choice, log-probabilities, stop sequences, incremental text
    torch_runner.py   the engine's PyTorch side: a shared key/value cache of rows, mixed-adapter batches
    row_lora.py       each row's LoRA adapter applied in two matmuls per layer, whatever the mix
    llama_runner.py   the engine's llama.cpp side: a bundle's GGUF, a sequence per row
    ui.py             `ui=true`: the web page (ui/: chat, arena, runs) and its few routes beside the API
"""
