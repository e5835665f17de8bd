"""The mechscope transcoder set ``gemma-3-270m-plt-v1``: its files are in ``files/`` beside this module
(circuit-tracer's layout: ``config.yaml`` and ``layer_{i}.safetensors``). Importing it does nothing."""
