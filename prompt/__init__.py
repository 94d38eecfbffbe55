"""The prompt language as AUTOMATIC1111 reads it: emphasis, BREAK and prompt editing (``parser``), 75-token chunks
(``chunks``), the CLIP tokenizer with its shipped vocabulary (``tokenizer``), and encoding through a model's text
towers with textual-inversion vectors (``encode``)."""
