"""The mechscope transcoder set ``gemma-3-270m-clt-v1``: its files are in ``files/`` beside this module
(circuit-tracer's layout). Importing it does nothing."""
