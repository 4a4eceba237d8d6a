"""Release: from a run to files other tools load.

    merge.py          `convobot merge`: the adapter merged into its fp32 base, three checks, a release bundle
    card.py           the bundle's model card and licence; upload to the Hugging Face Hub
    onnx_export.py    `convobot export-onnx`: ONNX through torch.onnx, checked with onnxruntime
    gguf.py           `convobot export-gguf`: GGUF through llama.cpp's converter, checked with llama.cpp; Ollama
    llama_convert.py  the converter, run with one override for byte-level GPT-2 tokenizers it has not seen
"""
