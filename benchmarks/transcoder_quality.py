"""Print the README table of a transcoder set's held-out quality (from its config.yaml).

    .venv/bin/python benchmarks/transcoder_quality.py [SET]

The figures are measured by ``mechscope train`` on held-out corpus text after JumpReLU calibration:
FVU (normalised MSE), mean L0, and the fraction of features that never fire on that text.
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
    print(f"trained on {training['tokens_trained']:,} tokens ({training['method']}, k={training['k']}); "
          f"held-out tokens per layer: {metrics[0]['n_tokens']:,}")
    print("| layer | FVU | L0 | dead |")
    print("|---:|---:|---:|---:|")
    for m in metrics:
        print(f"| {m['layer']} | {m['fvu']:.3f} | {m['l0']:.1f} | {m['dead_fraction']:.3f} |")
    n = len(metrics)
    print(f"| mean | {sum(m['fvu'] for m in metrics) / n:.3f} | {sum(m['l0'] for m in metrics) / n:.1f} | "
          f"{sum(m['dead_fraction'] for m in metrics) / n:.3f} |")
    print(f"max FVU {max(m['fvu'] for m in metrics):.3f}, max dead {max(m['dead_fraction'] for m in metrics):.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
