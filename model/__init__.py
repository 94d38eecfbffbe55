"""The networks, as modules whose attribute paths are the checkpoint's keys (``unet``, ``vae``, ``clip``,
``open_clip``, ``conditioner``, ``sd``), the config each is built from (``config``, ``text_config``: every shape from
the weights), loading a file into them (``load``), the built-in demo model (``demo``) and the VAE decode guard."""
