"""Print the README table of a transcoder set's held-out quality (from its config.yaml).

    .venv/bin/python benchmarks/transcoder_quality.py [SET]

The figures are measured by ``mechscope train`` on held-out corpus text after JumpReLU calibration:
FVU (normalised MSE), mean L0, and the fraction of features that never fire on that text. A set
trained on a corpus with chat transcripts also has them on each kind of text apart (``FVU text`` on
the corpus's other sources, ``FVU chat`` on the held-out transcripts).
"""

from __future__ import annotations

import sys

import yaml

from mechscope.transcoders.io import resolve_transcoders


def main(name: str = "gemma-3-270m-plt-v1") -> None:
    path = resolve_transcoders(name)
    config = yaml.safe_load((path / "config.yaml").read_text())
    metrics = config["heldout_metrics"]
    training = config["training"]
    size_mb = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    print(f"set {name}: {config['n_layers']} layers x {config['d_transcoder']} features, "
          f"skip={config['skip_connection']}, {size_mb:.1f} MB on disk")
    # a JumpReLU + tanh run has a sparsity weight; TopK runs (and their calibrated sets) have k
    sparsity = f"lambda={training['sparsity_coef']:g}" if "tanh" in training["method"] else f"k={training['k']}"
    print(f"trained on {training['tokens_trained']:,} tokens ({training['method']}, {sparsity}); "
          f"held-out tokens per layer: {metrics[0]['n_tokens']:,}")
    if "refit_gain" in training:
        print("decoders refit by least squares: share of the squared error removed on the fitting text, mean "
              f"{sum(training['refit_gain']) / len(training['refit_gain']):.3f}")
    kinds = config.get("heldout_metrics_by_kind", {})
    extra = [k for k in ("corpus", "chat") if k in kinds]
    names = {"corpus": "FVU text", "chat": "FVU chat"}
    print("| layer | FVU | " + "".join(f"{names[k]} | " for k in extra) + "L0 | dead |")
    print("|---:|---:|" + "---:|" * len(extra) + "---:|---:|")
    for i, m in enumerate(metrics):
        by_kind = "".join(f"{kinds[k][i]['fvu']:.3f} | " for k in extra)
        print(f"| {m['layer']} | {m['fvu']:.3f} | {by_kind}{m['l0']:.1f} | {m['dead_fraction']:.3f} |")
    n = len(metrics)
    means = "".join(f"{sum(r['fvu'] for r in kinds[k]) / n:.3f} | " for k in extra)
    print(f"| mean | {sum(m['fvu'] for m in metrics) / n:.3f} | {means}{sum(m['l0'] for m in metrics) / n:.1f} | "
          f"{sum(m['dead_fraction'] for m in metrics) / n:.3f} |")
    print(f"max FVU {max(m['fvu'] for m in metrics):.3f}, max dead {max(m['dead_fraction'] for m in metrics):.3f}"
          + "".join(f", max {names[k]} {max(r['fvu'] for r in kinds[k]):.3f}" for k in extra))


if __name__ == "__main__":
    main(*sys.argv[1:])
