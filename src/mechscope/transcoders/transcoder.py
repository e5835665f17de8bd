"""Per-layer transcoders and the `TranscoderSet` interface that cross-layer transcoders share.

A per-layer transcoder (PLT) at layer ``l`` reads the MLP input ``x`` and reconstructs the MLP
output: ``a = act(W_enc x + b_enc)``, ``y_hat = W_dec^T a + b_dec (+ W_skip x)``
(Dunefsky et al. 2024; skip connection: Paulo et al. 2025, arXiv:2501.18823). A cross-layer
transcoder (CLT) has features at layer ``l`` that decode into every layer ``>= l``
(Ameisen et al. 2025). Both answer the same questions through :class:`TranscoderSet`:
``encode(layer, x)``, ``output_layers(layer)``, ``decoder_vectors(layer, features)``
(``[n, n_output_layers, d_model]``) and ``reconstruct(acts, mlp_inputs)``, so attribution never asks
which kind it has.

Orientation follows circuit-tracer's files: ``W_enc`` and ``W_dec`` are both
``[d_transcoder, d_model]`` and ``W_skip`` is ``[d_model, d_model]`` applied as ``x @ W_skip.T``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import nn

from mechscope.transcoders.activations import make_activation

__all__ = ["PerLayerTranscoder", "TranscoderSet", "PerLayerTranscoderSet", "CrossLayerTranscoderSet"]


class PerLayerTranscoder(nn.Module):
    """One layer's transcoder.

    Args:
        d_model: residual width.
        d_transcoder: number of features.
        activation: ``relu`` | ``jumprelu`` | ``topk``.
        k: TopK's k.
        skip_connection: whether to learn ``W_skip``.
    """

    def __init__(
        self,
        d_model: int,
        d_transcoder: int,
        activation: str = "jumprelu",
        k: int | None = None,
        skip_connection: bool = False,
    ):
        super().__init__()
        self.d_model, self.d_transcoder = d_model, d_transcoder
        self.W_enc = nn.Parameter(torch.zeros(d_transcoder, d_model))
        self.b_enc = nn.Parameter(torch.zeros(d_transcoder))
        self.W_dec = nn.Parameter(torch.zeros(d_transcoder, d_model))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.W_skip = nn.Parameter(torch.zeros(d_model, d_model)) if skip_connection else None
        self.activation_function = make_activation(activation, d_transcoder, k)

    @property
    def activation(self) -> str:
        return self.activation_function.name

    def pre_activations(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_transcoder"]:
        return x @ self.W_enc.T + self.b_enc

    def encode(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_transcoder"]:
        return self.activation_function(self.pre_activations(x))

    def skip(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_model"] | None:
        return None if self.W_skip is None else x @ self.W_skip.T

    def decode(
        self, acts: Float[torch.Tensor, "... d_transcoder"], x: Float[torch.Tensor, "... d_model"]
    ) -> Float[torch.Tensor, "... d_model"]:
        out = acts @ self.W_dec + self.b_dec
        skip = self.skip(x)
        return out if skip is None else out + skip

    def forward(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_model"]:
        return self.decode(self.encode(x), x)


class TranscoderSet(nn.Module):
    """Interface of a set of transcoders covering every layer of a model.

    Attributes:
        n_layers, d_model: shape of the model the set was trained on.
        model_name: Hugging Face id of that model; ``scan``: the set's identifier.
        kind: ``per-layer`` or ``cross-layer`` (recorded in graphs, shown by the explorer).
    """

    kind = "per-layer"
    n_layers: int
    d_model: int
    model_name: str
    scan: str
    feature_input_hook = "mlp.hook_in"
    feature_output_hook = "hook_mlp_out"

    def d_transcoder(self, layer: int) -> int:
        raise NotImplementedError

    def output_layers(self, layer: int) -> range:
        """Layers that features of ``layer`` write to (``[layer]`` for a PLT)."""
        raise NotImplementedError

    def encode(self, layer: int, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_transcoder"]:
        raise NotImplementedError

    def pre_activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encoder_vectors(self, layer: int, features: Int[torch.Tensor, "n"]) -> Float[torch.Tensor, "n d_model"]:
        raise NotImplementedError

    def encoder_bias(self, layer: int, features: Int[torch.Tensor, "n"]) -> Float[torch.Tensor, "n"]:
        raise NotImplementedError

    def decoder_vectors(
        self, layer: int, features: Int[torch.Tensor, "n"]
    ) -> Float[torch.Tensor, "n n_out d_model"]:
        raise NotImplementedError

    def skip(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """Linear skip path into ``layer``'s output, or ``None``."""
        raise NotImplementedError

    def reconstruct(
        self,
        acts: list[Float[torch.Tensor, "... d_transcoder"]],
        mlp_inputs: list[Float[torch.Tensor, "... d_model"]],
    ) -> list[Float[torch.Tensor, "... d_model"]]:
        """Transcoder output at every layer from every layer's feature activations."""
        raise NotImplementedError


class PerLayerTranscoderSet(TranscoderSet):
    """One :class:`PerLayerTranscoder` per layer."""

    def __init__(self, transcoders: list[PerLayerTranscoder], model_name: str = "", scan: str = ""):
        super().__init__()
        self.transcoders = nn.ModuleList(transcoders)
        self.n_layers = len(transcoders)
        self.d_model = transcoders[0].d_model
        self.model_name, self.scan = model_name, scan

    def __getitem__(self, layer: int) -> PerLayerTranscoder:
        return self.transcoders[layer]

    @property
    def activation(self) -> str:
        return self.transcoders[0].activation

    def d_transcoder(self, layer: int) -> int:
        return self.transcoders[layer].d_transcoder

    def output_layers(self, layer: int) -> range:
        return range(layer, layer + 1)

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.transcoders[layer].encode(x)

    def pre_activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.transcoders[layer].pre_activations(x)

    def encoder_vectors(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self.transcoders[layer].W_enc[features]

    def encoder_bias(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self.transcoders[layer].b_enc[features]

    def decoder_vectors(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self.transcoders[layer].W_dec[features][:, None, :]  # (n, 1, d_model)

    def skip(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        return self.transcoders[layer].skip(x)

    def reconstruct(self, acts, mlp_inputs):
        return [tc.decode(a, x) for tc, a, x in zip(self.transcoders, acts, mlp_inputs)]


class CrossLayerTranscoderSet(TranscoderSet):
    """A cross-layer transcoder (CLT): features read the MLP input of their layer ``l`` and write to
    the MLP outputs of layers ``l .. n_layers - 1`` (Ameisen et al. 2025, "Circuit Tracing", section
    "Building an interpretable replacement model"). The reconstruction of layer ``m``'s MLP output
    sums the decoded features of every layer ``<= m``:

        y_hat[m] = b_dec[m] + sum_{l <= m} a[l] @ W_dec[l][:, m - l] (+ x[m] @ W_skip[m].T)

    Parameters, per layer ``l`` (circuit-tracer's CLT file layout): ``W_enc[l]
    [d_transcoder, d_model]``, ``b_enc[l] [d_transcoder]``, ``b_dec[l] [d_model]`` (the bias of
    output layer ``l``), ``W_dec[l] [d_transcoder, n_layers - l, d_model]``, optional
    ``W_skip[l] [d_model, d_model]``; the activation (ReLU, JumpReLU with per-feature thresholds, or
    TopK) is per layer.

    Args:
        n_layers, d_model, d_transcoder: sizes (the same number of features at every layer).
        activation: ``relu`` | ``jumprelu`` | ``topk``; ``k`` for TopK.
        skip_connection: a linear skip path per output layer.
        decoders: hold the decoders in memory (``False``: a loader supplies ``lazy_decoder``).
    """

    kind = "cross-layer"

    def __init__(self, n_layers: int, d_model: int, d_transcoder: int, activation: str = "jumprelu",
                 k: int | None = None, skip_connection: bool = False, model_name: str = "", scan: str = "",
                 decoders: bool = True):
        super().__init__()
        self.n_layers, self.d_model, self._d_transcoder = n_layers, d_model, d_transcoder
        self.model_name, self.scan = model_name, scan
        self.W_enc = nn.ParameterList(nn.Parameter(torch.zeros(d_transcoder, d_model)) for _ in range(n_layers))
        self.b_enc = nn.ParameterList(nn.Parameter(torch.zeros(d_transcoder)) for _ in range(n_layers))
        self.b_dec = nn.ParameterList(nn.Parameter(torch.zeros(d_model)) for _ in range(n_layers))
        # W_dec[l]: (d_transcoder, n_layers - l, d_model): feature of layer l -> output layers l..n_layers-1
        # decoders=False: the rows come from ``lazy_decoder`` (set by the loader)
        self.W_dec = nn.ParameterList(nn.Parameter(torch.zeros(d_transcoder if decoders else 0, n_layers - layer, d_model))
                                      for layer in range(n_layers))
        self.W_skip = (nn.ParameterList(nn.Parameter(torch.zeros(d_model, d_model)) for _ in range(n_layers))
                       if skip_connection else None)
        self.activation_functions = nn.ModuleList(make_activation(activation, d_transcoder, k) for _ in range(n_layers))

    @property
    def activation(self) -> str:
        return self.activation_functions[0].name

    def d_transcoder(self, layer: int) -> int:
        return self._d_transcoder

    def output_layers(self, layer: int) -> range:
        return range(layer, self.n_layers)

    def pre_activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc[layer].T + self.b_enc[layer]

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.activation_functions[layer](self.pre_activations(layer, x))

    def encoder_vectors(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self.W_enc[layer][features]

    def encoder_bias(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self.b_enc[layer][features]

    #: when set (:func:`mechscope.transcoders.clt_io.load_clt` with ``lazy_decoder``), decoder rows
    #: are read from the files on demand instead of from ``W_dec``
    lazy_decoder = None

    def decoder_vectors(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        if self.lazy_decoder is not None:
            return self.lazy_decoder.rows(layer, features).to(self.b_dec[layer].device)
        return self.W_dec[layer][features]  # (n, n_layers - layer, d_model)

    def skip(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.W_skip is None else x @ self.W_skip[layer].T

    def reconstruct(self, acts, mlp_inputs):
        # only the decoder rows of features active somewhere are needed: (n_active, n_out, d_model) each
        decoders = []
        for layer, a in enumerate(acts):
            active = (a.reshape(-1, a.shape[-1]) != 0).any(0).nonzero().flatten()
            decoders.append((active, self.decoder_vectors(layer, active)))
        outputs = []
        for m in range(self.n_layers):
            out = self.b_dec[m] + sum(acts[l][..., active] @ rows[:, m - l] for l, (active, rows) in enumerate(decoders[: m + 1]))
            skip = self.skip(m, mlp_inputs[m])
            outputs.append(out if skip is None else out + skip)
        return outputs
