"""Real text for the selection-vs-chance benchmark: corpora read from what Python and the
installed packages ship (no download), a tokenizer and a small Llama pretrained on them."""
