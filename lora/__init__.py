"""LoRA as AUTOMATIC1111 applies it: kohya and LyCORIS key names mapped to the model's modules (``keys``), the weight
deltas of LoRA, LoCon, LoHa and LoKr (``deltas``), and application in place from pristine copies (``apply``), so a
parameter keeps its storage and a captured CUDA graph stays valid."""
