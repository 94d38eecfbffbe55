"""The files users bring, read safely: checkpoints (``.safetensors`` with every header field checked; ``.ckpt``
through torch's ``weights_only`` unpickler and a narrow allowlist), external VAE files, LoRA files, textual-inversion
embeddings, the key layout (``keys``: prefixes, normalised once), file hashes as AUTOMATIC1111 writes them and
where a loaded model came from (``source``)."""
