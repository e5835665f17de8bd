"""The graph explorer: a local web UI over exported attribution graphs and the feature store.

``mechscope serve DIR`` serves every graph JSON under ``DIR`` (the Neuronpedia exchange format that
``mechscope trace`` writes) to a browser page shipped in ``static/`` (plain JavaScript, no build
step, nothing loaded from the network). This package never imports torch: it reads JSON and the
SQLite feature store only.
"""
