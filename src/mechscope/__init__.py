"""mechscope: a microscope for language models.

Replace a model's MLPs with sparse transcoder features, build attribution graphs that show which
features cause an output, prune them, group them into supernodes, test them with interventions
on the real model, and export them for exploration. Importing this package does
nothing else: no torch import, no logging setup, no file or network access. The public API below
is loaded on first use, in pipeline order.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> module that defines it, in pipeline order
_API = {
    "CorpusConfig": "mechscope.data.corpus",
    "build_corpus": "mechscope.data.corpus",
    "TokenStream": "mechscope.data.corpus",
    "load_model": "mechscope.models.loading",
    "ModelAdapter": "mechscope.models.adapter",
    "PerLayerTranscoder": "mechscope.transcoders.transcoder",
    "TranscoderSet": "mechscope.transcoders.transcoder",
    "PerLayerTranscoderSet": "mechscope.transcoders.transcoder",
    "CrossLayerTranscoderSet": "mechscope.transcoders.transcoder",
    "load_transcoder_set": "mechscope.transcoders.io",
    "save_transcoder_set": "mechscope.transcoders.io",
    "load_gemma_scope_2": "mechscope.transcoders.io",
    "TrainConfig": "mechscope.training.trainer",
    "train_transcoders": "mechscope.training.trainer",
    "ReplacementModel": "mechscope.replacement.replacement_model",
    "AttributionConfig": "mechscope.attribution.attribute",
    "LogitTarget": "mechscope.attribution.targets",
    "attribute": "mechscope.attribution.attribute",
    "Graph": "mechscope.graph.graph",
    "prune_graph": "mechscope.graph.prune",
    "PruneResult": "mechscope.graph.prune",
    "graph_scores": "mechscope.graph.prune",
    "logit_influence": "mechscope.graph.prune",
    "node_influence": "mechscope.graph.prune",
    "signed_effects": "mechscope.graph.effects",
    "Supernode": "mechscope.graph.supernodes",
    "suggest_supernodes": "mechscope.graph.supernodes",
    "supernode_view": "mechscope.graph.supernodes",
    "save_graph": "mechscope.graph.io",
    "load_graph": "mechscope.graph.io",
    "to_neuronpedia": "mechscope.export.neuronpedia",
    "validate_neuronpedia": "mechscope.export.schema",
    "read_neuronpedia": "mechscope.export.schema",
    "FeatureTarget": "mechscope.interventions.records",
    "ErrorTarget": "mechscope.interventions.records",
    "SupernodeTarget": "mechscope.interventions.records",
    "Intervention": "mechscope.interventions.records",
    "InterventionConfig": "mechscope.interventions.intervene",
    "run_interventions": "mechscope.interventions.intervene",
    "build_feature_store": "mechscope.features.build",
    "FeatureStore": "mechscope.features.store",
    "probe_feature": "mechscope.features.probe",
    "DreamConfig": "mechscope.features.dream",
    "dream_feature": "mechscope.features.dream",
    "ServeConfig": "mechscope.server.config",
    "create_app": "mechscope.server.app",
    "MechscopeError": "mechscope.errors",
}

__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mechscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__ + ["__version__"])
