"""``mechscope train``: train a transcoder for every layer, resumable.

Run it again with the same settings after an interruption and it resumes from the last checkpoint
in ``--checkpoint-dir`` (default ``<cache>/training/<name>``).
"""

from __future__ import annotations

from pathlib import Path

import click

from mechscope.cli.options import default_of
from mechscope.errors import BadInputError
from mechscope.training.trainer import TrainConfig

__all__ = ["train"]


def _opt(name: str, type_, help_: str):
    return click.option(f"--{name.replace('_', '-')}", name, type=type_, default=default_of(TrainConfig, name),
                        show_default=True, help=help_)


@click.command()
@click.option("--model", "model_name", default="gemma-3-270m", show_default=True)
@click.option("--corpus", "corpus_path", default=None,
              help="Built corpus: a name under <cache>/corpus (e.g. chat-qwen2.5-coder-0.5b-instruct) or a directory "
                   "(default: the default corpus).")
@click.option("--name", default="gemma-3-270m-plt-v1", show_default=True, help="Name of the set.")
@click.option("--out", "out_dir", default=None, help="Where to write the set (default: <cache>/transcoders/NAME).")
@click.option("--checkpoint-dir", default=None, help="Resumable state (default: <cache>/training/NAME).")
@_opt("d_transcoder", int, "Features per layer.")
@_opt("k", int, "TopK k during training.")
@_opt("n_tokens", int, "Training tokens.")
@_opt("batch_sequences", int, "Sequences per step.")
@_opt("ctx_len", int, "Tokens per sequence (BOS included).")
@_opt("lr", float, "Peak learning rate.")
@_opt("eval_sequences", int, "Held-out sequences for evaluation.")
@_opt("checkpoint_every_s", float, "Seconds between checkpoints.")
@_opt("calibration_sequences", int, "Sequences whose pre-activations set the JumpReLU thresholds.")
@_opt("refit_sequences", int, "After calibration, refit decoders by least squares on this many sequences (0 = none).")
@_opt("seed", int, "Seed.")
@click.option("--method", type=click.Choice(["topk", "jumprelu"]), default=default_of(TrainConfig, "method"),
              show_default=True, help="topk: TopK + AuxK, JumpReLU calibrated; jumprelu (--kind clt): learned "
                                      "JumpReLU thresholds, tanh sparsity penalty (Ameisen et al. 2025).")
@_opt("sparsity_coef", float, "jumprelu: final weight of the tanh sparsity penalty (ramped from 0).")
@_opt("sparsity_c", float, "jumprelu: scale c inside tanh(c a ||W_dec||).")
@_opt("preact_coef", float, "jumprelu: weight of the pre-activation penalty against dead features.")
@_opt("bandwidth", float, "jumprelu: width of the straight-through kernel (normalised units).")
@_opt("threshold_init", float, "jumprelu: initial threshold (normalised units).")
@click.option("--model-dtype", "--dtype", "model_dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True, help="Dtype of the model forward giving the training activations (calibration and "
                                      "held-out figures always use float32).")
@click.option("--decoder-dtype", type=click.Choice(["float32", "bfloat16"]), default=default_of(TrainConfig, "decoder_dtype"),
              show_default=True, help="jumprelu: precision of the products with the CLT's decoders (bfloat16: 2.4x faster "
                                      "where the CPU or GPU computes it natively; parameters stay float32).")
@click.option("--device", default="auto", show_default=True,
              help="cpu | cuda | cuda:N | mps | auto. Under torchrun each rank takes its own GPU (LOCAL_RANK).")
@click.option("--kind", type=click.Choice(["plt", "clt"]), default="plt", show_default=True,
              help="Per-layer transcoders, or one cross-layer transcoder (features write to every later layer).")
@click.option("--no-skip", is_flag=True, help="No skip connection.")
@click.option("--shard-features", is_flag=True,
              help="Under torchrun, with --kind clt: each rank holds a slice of every layer's features (for a CLT "
                   "larger than one device) instead of a share of each batch.")
@click.option("--no-progress", is_flag=True)
def train(model_name, corpus_path, name, out_dir, checkpoint_dir, kind, no_skip, shard_features, no_progress, device,
          **fields):
    """Train per-layer transcoders (or, with --kind clt, a cross-layer transcoder) on the corpus: TopK + AuxK,
    then JumpReLU calibration; or, for a CLT, --method jumprelu (learned thresholds, tanh sparsity).

    When the corpus holds chat transcripts (`mechscope corpus chat`), held-out figures are also
    reported separately on corpus text and on chat transcripts.

    Data-parallel on several processes: `torchrun --nproc-per-node N -m mechscope train ...` (each rank
    computes its share of every batch; gradients are all-reduced; rank 0 checkpoints and saves)."""
    from mechscope import distributed
    from mechscope.devices import resolve_device

    cfg = TrainConfig(skip_connection=not no_skip, **fields)
    if shard_features and kind != "clt":
        raise BadInputError("--shard-features splits a cross-layer transcoder's features; use it with --kind clt")
    if cfg.method != "topk" and kind != "clt":
        raise BadInputError(f"--method {cfg.method} trains cross-layer transcoders only; use it with --kind clt "
                            "(per-layer sets train with --method topk)")
    target = resolve_device(device)
    distributed.init("nccl" if target.type == "cuda" else "gloo")

    from mechscope.data.corpus import TokenStream, resolve_corpus
    from mechscope.models.loading import load_model
    from mechscope.paths import cache_root
    from mechscope.training.trainer import train_transcoders

    corpus = resolve_corpus(corpus_path)
    model = load_model(model_name, dtype=cfg.model_dtype, device=target)
    train_stream = TokenStream(corpus, model.tokenizer, cfg.ctx_len, "train", cfg.seed)
    heldout = TokenStream(corpus, model.tokenizer, cfg.ctx_len, "heldout", cfg.seed)
    names = [e["name"] for e in train_stream.manifest["sources"]]
    by_kind = {}
    if "chat" in names and len(names) > 1:
        by_kind = {"corpus": TokenStream(corpus, model.tokenizer, cfg.ctx_len, "heldout", cfg.seed,
                                         sources=tuple(n for n in names if n != "chat")),
                   "chat": TokenStream(corpus, model.tokenizer, cfg.ctx_len, "heldout", cfg.seed, sources=("chat",))}
    eval_adapter = None if cfg.model_dtype == "float32" else (lambda: load_model(model_name, dtype="float32", device=target))
    out = Path(out_dir) if out_dir else cache_root() / "transcoders" / name
    ckpt = Path(checkpoint_dir) if checkpoint_dir else cache_root() / "training" / name
    if kind == "clt":
        from mechscope.training.clt_trainer import train_clt

        _, metrics = train_clt(model, train_stream, heldout, cfg, out, ckpt, progress=not no_progress,
                               eval_adapter=eval_adapter, shard_features=shard_features)
    else:
        _, metrics = train_transcoders(model, train_stream, heldout, cfg, out, ckpt, progress=not no_progress,
                                       eval_adapter=eval_adapter, heldout_by_kind=by_kind)
    if not distributed.is_main():
        return
    click.echo(f"{'layer':>5} {'FVU':>7} {'L0':>7} {'dead':>6}")
    for m in metrics:
        click.echo(f"{m.layer:>5} {m.fvu:>7.3f} {m.l0:>7.1f} {m.dead_fraction:>6.3f}")
    click.echo(f"saved {out}")
