"""Decoder geometry of features: direct logit effects, decoder cosines, antipodal pairs.

- *Direct logit effect* of a feature: the unembedding applied to its decoder direction through the
  final norm's linear part (gain, and centring for LayerNorm; the norm's scale and bias dropped),
  ``W_U · norm(d)``; its top and bottom tokens are the "output tokens" of a feature dashboard
  (Neuronpedia's ``pos_str`` / ``neg_str``).
- *Decoder cosine*: cosine similarity of unit-normalised decoder vectors; for cross-layer
  transcoders the vector is the concatenation over every output layer (zero where a feature does
  not write), so features of different layers of a per-layer set are orthogonal.
- *Antipodal pairs*: cosine below ``-0.9`` and never active together on the corpus — the pattern
  dense SAE latents show and, per Anthropic's circuits update on dense features, dense CLT
  features do not.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int

from mechscope.data.corpus import TokenStream
from mechscope.errors import BadInputError
from mechscope.models.adapter import ModelAdapter
from mechscope.replacement.replacement_model import ReplacementModel
from mechscope.transcoders.transcoder import TranscoderSet

__all__ = ["logit_effects", "decoder_matrix", "decoder_cosines", "antipodal_pairs", "coactivation"]


def _check(transcoders: TranscoderSet, layer: int, features: torch.Tensor) -> None:
    if not 0 <= layer < transcoders.n_layers:
        raise BadInputError(f"layer {layer} is out of range 0..{transcoders.n_layers - 1}")
    n = transcoders.d_transcoder(layer)
    if len(features) and (int(features.min()) < 0 or int(features.max()) >= n):
        raise BadInputError(f"feature indices must be in 0..{n - 1} at layer {layer}, got {features.tolist()[:8]}")


@torch.no_grad()
def logit_effects(
    model: ModelAdapter, transcoders: TranscoderSet, layer: int, features: Int[torch.Tensor, "n"]
) -> Float[torch.Tensor, "n vocab"]:
    """Direct logit effect of each feature (summed over its output layers).

    Raises:
        BadInputError: layer or feature index out of range.
    """
    _check(transcoders, layer, features)
    direction = transcoders.decoder_vectors(layer, features).float().sum(1)  # [n, d_model]
    norm = model.final_norm()
    ones = torch.ones(*direction.shape[:-1], 1, device=direction.device)
    linear = model.normalize(norm, direction, ones) - model.normalize(norm, torch.zeros_like(direction), ones)
    return linear.float() @ model.W_U.float().T


def decoder_matrix(
    transcoders: TranscoderSet, features: list[tuple[int, int]]
) -> Float[torch.Tensor, "n n_layers_x_d_model"]:
    """Unit-norm decoder vectors of ``(layer, feature)`` pairs, each laid out over every layer
    ``[n_layers * d_model]`` (zero outside the layers the feature writes to).

    Raises:
        BadInputError: a layer or feature index out of range.
    """
    d, n_layers = transcoders.d_model, transcoders.n_layers
    rows = torch.zeros(len(features), n_layers * d)
    for i, (layer, feature) in enumerate(features):
        _check(transcoders, layer, torch.tensor([feature]))
        vectors = transcoders.decoder_vectors(layer, torch.tensor([feature]))[0].float().cpu()  # [n_out, d]
        for j, out_layer in enumerate(transcoders.output_layers(layer)):
            rows[i, out_layer * d : (out_layer + 1) * d] = vectors[j]
    return rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)


def decoder_cosines(transcoders: TranscoderSet, features: list[tuple[int, int]]) -> Float[torch.Tensor, "n n"]:
    """Pairwise cosine similarity of the features' decoder vectors (see :func:`decoder_matrix`)."""
    rows = decoder_matrix(transcoders, features)
    return rows @ rows.T


def antipodal_pairs(
    cosines: Float[torch.Tensor, "n n"], coactive: Int[torch.Tensor, "n n"], threshold: float = -0.9
) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, cosine)``, ``i < j``, with cosine below ``threshold`` that were never active
    on the same token (``coactive[i, j] == 0``: counts of tokens where both fire).

    Raises:
        BadInputError: shapes differ or are not square, or ``threshold`` is outside [-1, 0].
    """
    if cosines.shape != coactive.shape or cosines.ndim != 2 or cosines.shape[0] != cosines.shape[1]:
        raise BadInputError(f"cosines {tuple(cosines.shape)} and coactive {tuple(coactive.shape)} must be equal square")
    if not -1.0 <= threshold <= 0.0:
        raise BadInputError(f"antipodal threshold must be in [-1, 0], got {threshold}")
    i, j = torch.triu_indices(len(cosines), len(cosines), offset=1)
    keep = (cosines[i, j] < threshold) & (coactive[i, j] == 0)
    return [(int(a), int(b), float(cosines[a, b])) for a, b in zip(i[keep], j[keep])]


@torch.no_grad()
def coactivation(
    rm: ReplacementModel, stream: TokenStream, features: list[tuple[int, int]], n_sequences: int, batch: int = 8,
    progress=False,
) -> Int[torch.Tensor, "n n"]:
    """Tokens (BOS excluded) on which each pair of features is active together, over the first
    ``n_sequences`` sequences of ``stream``; the diagonal counts each feature's active tokens.
    ``progress``: a bar over the sequences (:class:`mechscope.progress.Progress` or a bool)."""
    import numpy as np

    from mechscope.progress import Progress

    bar = Progress.of(progress).bar(total=n_sequences, desc="co-activation", unit="seq")
    layers = sorted({layer for layer, _ in features})
    counts = torch.zeros(len(features), len(features), dtype=torch.long)
    for start in range(0, n_sequences, batch):
        ids = torch.as_tensor(np.stack([stream.sequence(i) for i in range(start, min(start + batch, n_sequences))]))
        inputs, _ = rm.model.run_with_mlp_sites(ids, layers=layers)
        by_layer = dict(zip(layers, inputs))
        active = torch.stack([
            rm.transcoders.encode(layer, by_layer[layer][:, 1:].float())[..., feature].reshape(-1) > 0
            for layer, feature in features
        ]).long()  # [n, tokens]
        counts += active @ active.T
        bar.update(len(ids))
    bar.close()
    return counts
