"""Per-layer transcoder training throughput: mechscope against EleutherAI's sparsify, side by side.

    bash benchmarks/setup_sparsify.sh                    # once: eai-sparsify 1.3.3 in benchmarks/.venv-sparsify
    .venv/bin/python benchmarks/vs_sparsify.py [--layer 6] [--tokens 400000] [--width 1792] [--k 56]
    .venv/bin/python benchmarks/vs_sparsify.py --quick   # a smoke run in seconds

One layer pair, the same tokens. The MLP input and output of ``--layer`` of ``gemma-3-270m``
(mechscope's sites, BOS dropped, float32) are read once for ``--tokens`` training tokens from the
default corpus (``TokenStream``, ctx_len 128, 16 sequences a batch) and for ``--heldout-sequences``
held-out sequences, and cached as ``.npy`` under ``$MECHSCOPE_HOME/bench/vs_sparsify/``. Both tools
then train a TopK transcoder on those arrays, in the same order, with the same k, number of features,
peak learning rate (Adam, betas 0.9/0.999), warm-up steps, tokens per optimizer step (one 16-sequence
batch is 4 steps of 508 tokens in ``mechscope train``; sparsify gets batches of 4 sequences of 127
tokens, so its steps are the same slices), skip connection, AuxK weight and dead-feature window:

- mechscope: ``TopKTrainee`` and ``_optimizer_step`` from ``mechscope.training.trainer``, in the loop of
  ``train_transcoders`` without the model forward and checkpoints.
- sparsify, in its own virtualenv and process: its own ``sparsify.Trainer.fit()`` (``SparseCoder`` with
  ``transcode=True``; ``sparsify/trainer.py``, ``sparsify/sparse_coder.py`` of eai-sparsify 1.3.3),
  driven by a stand-in "model" whose one layer replays the cached input/output rows instead of
  running Gemma, and whose end-of-training checkpoint is skipped (the weights are saved after the
  clock stops with ``SparseCoder.save_to_disk``).

tokens/s counts the training loop only (no model forward, no start-up, no saving), with the same
number of torch threads in both processes, on the CPU (the sparsify venv holds the CPU torch wheel;
on a GPU sparsify would add a bfloat16 autocast). Both results are evaluated by the same code on the
held-out arrays: FVU = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 and mean L0 (``MetricsAccumulator``),
sparsify's weights read by mechscope's ``load_sparsify``; sparsify's own forward gives its FVU again as
a check. A third row gives mechscope's set as ``mechscope train`` saves it (JumpReLU thresholds
calibrated to the TopK firing rates, here on the last training tokens instead of a separate
calibration stream).

What is not the same (each tool keeps its own recipe; printed with the results too):

- input scaling: mechscope trains on x and y divided by their RMS norms (from the first batch);
  sparsify trains in raw units, so the same learning rate is a different step size relative to the
  weights.
- decoder: mechscope keeps decoder rows at unit norm after every step; sparsify leaves a
  transcoder's decoder free (``normalize_decoder`` applies to autoencoders only).
- initialisation: mechscope starts from random unit decoder rows, encoder = 0.1 x decoder, the skip
  fitted by ridge regression on the first 16-sequence batch; sparsify from nn.Linear's encoder with
  its bias centring the first step's pre-activations, a zero decoder, a zero skip.
- dead features: both add an AuxK loss (weight ``aux_coef``, dead after ``dead_after_tokens``), but
  mechscope's uses the top 256 dead features and divides by the residual's energy, sparsify's the top
  d_model / 2 scaled by min(dead / (d_model / 2), 1) and divides by the target's variance; mechscope
  also resamples dead features every 500 steps in the first 70 % of training, sparsify never does.
- schedule: mechscope warms up linearly, holds, and decays linearly over the last 20 % to 2 % of the
  peak; sparsify (``get_linear_schedule_with_warmup``) decays linearly to 0 from the end of warm-up.
- sparsify counts a feature as fired when it is in the top k, even at activation 0.
- the target: both learn mechscope's sites; for Gemma the output site includes the post-feedforward
  norm, so sparsify's own CLI (hookpoint ``layers.N.mlp``) would learn a different map there.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

WORKER_FLAG = "--sparsify-worker"
WORKER = sys.argv[1:2] == [WORKER_FLAG]
if not WORKER:  # the worker runs in the sparsify venv, which has no mechscope
    from mechscope import load_model
    from mechscope.data.corpus import TokenStream, resolve_corpus
    from mechscope.paths import atomic_file, cache_root
    from mechscope.training.metrics import LayerMetrics, MetricsAccumulator
    from mechscope.training.trainer import TopKTrainee, TrainConfig, _lr, _optimizer_step, calibrated_thresholds
    from mechscope.transcoders.sparsify import load_sparsify
    from mechscope.transcoders.transcoder import PerLayerTranscoder

ROOT = Path(__file__).resolve().parent
SPARSIFY_PYTHON = ROOT / ".venv-sparsify" / "bin" / "python"
CALIBRATION_TOKENS = 512 * 127  # mechscope train's calibration_sequences x (ctx_len - 1)


@dataclass(frozen=True)
class BenchConfig:
    """One comparison.

    Attributes:
        model: mechscope model name or directory.
        layer: the layer whose MLP input/output pair both tools learn (0 <= layer < n_layers).
        tokens: training tokens (BOS excluded), rounded up to whole 16-sequence batches (2,032 tokens).
        width: features (sparsify's ``num_latents``, mechscope's ``d_transcoder``).
        k: active features per token (1 <= k <= width).
        lr: peak Adam learning rate of both.
        heldout_sequences: held-out sequences of 127 tokens for FVU and L0.
        threads: torch threads in both processes (the command line's default: torch's own count).
        seed: token order and initialisation.
    """

    model: str = "gemma-3-270m"
    layer: int = 6
    tokens: int = 400_000
    width: int = 1792
    k: int = 56
    lr: float = 1e-3
    heldout_sequences: int = 256
    threads: int = 2
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.k <= self.width:
            raise ValueError(f"k must be in [1, width={self.width}], got {self.k}")
        if self.tokens < 1 or self.heldout_sequences < 1 or self.threads < 1:
            raise ValueError(f"tokens, heldout_sequences and threads must be >= 1, got {self}")

    def train_config(self) -> TrainConfig:
        """mechscope's recipe at these sizes (every other field its default)."""
        cfg = TrainConfig(d_transcoder=self.width, k=self.k, lr=self.lr, seed=self.seed)
        return dataclasses.replace(cfg, n_tokens=self.n_batches(cfg) * cfg.tokens_per_step)

    def n_batches(self, cfg: TrainConfig) -> int:
        return math.ceil(self.tokens / cfg.tokens_per_step)


QUICK = dict(tokens=4 * 2032, width=128, k=16, heldout_sequences=16)


# ----------------------------------------------------------------------------- activations
def cache_activations(bench: BenchConfig, cfg: TrainConfig) -> dict[str, Path]:
    """``{train_in, train_out, heldout_in, heldout_out}``: ``[n, d_model]`` float32 ``.npy`` files of
    the layer's MLP input and output (BOS dropped), written once per model, corpus, layer and size."""
    corpus = resolve_corpus(None)
    digest = hashlib.sha256((corpus / "manifest.json").read_bytes()).hexdigest()[:8]
    model_tag = Path(bench.model).name.replace(".", "_")
    folder = cache_root() / "bench" / "vs_sparsify"
    splits = {"train": bench.n_batches(cfg), "heldout": math.ceil(bench.heldout_sequences / cfg.batch_sequences)}
    paths = {f"{split}_{site}": folder / f"{model_tag}-{digest}-L{bench.layer}-ctx{cfg.ctx_len}-seed{bench.seed}"
                                         f"-{split}{n * cfg.batch_sequences}.{site}.npy"
             for split, n in splits.items() for site in ("in", "out")}
    if all(p.exists() for p in paths.values()):
        return paths
    adapter = load_model(bench.model)
    if not 0 <= bench.layer < adapter.n_layers:
        raise ValueError(f"--layer {bench.layer} is not a layer of {bench.model} (0..{adapter.n_layers - 1})")
    for split, n_batches in splits.items():
        stream = TokenStream(corpus, adapter.tokenizer, cfg.ctx_len, split, bench.seed)
        rows = n_batches * cfg.tokens_per_step
        with atomic_file(paths[f"{split}_in"]) as tmp_in, atomic_file(paths[f"{split}_out"]) as tmp_out:
            x = np.lib.format.open_memmap(tmp_in, "w+", np.float32, (rows, adapter.d_model))
            y = np.lib.format.open_memmap(tmp_out, "w+", np.float32, (rows, adapter.d_model))
            for i, (_, batch) in zip(range(n_batches), stream.batches(cfg.batch_sequences)):
                ins, outs = adapter.run_with_mlp_sites(torch.as_tensor(batch), layers=[bench.layer])
                block = slice(i * cfg.tokens_per_step, (i + 1) * cfg.tokens_per_step)
                # drop BOS: (B, T, d) -> (B*(T-1), d)
                x[block] = ins[0][:, 1:].reshape(-1, adapter.d_model).float().numpy()
                y[block] = outs[0][:, 1:].reshape(-1, adapter.d_model).float().numpy()
            x.flush(), y.flush()
            del x, y
        print(f"cached {rows:,} {split} tokens of layer {bench.layer} in {paths[f'{split}_in'].parent}", file=sys.stderr)
    return paths


def _load(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(path))  # into memory, so the clock measures no disk reads


# ----------------------------------------------------------------------------- mechscope
def train_mechscope(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> tuple[TopKTrainee, float]:
    """``train_transcoders``' loop for one layer over cached ``[n, d_model]`` activations; returns the
    trainee and the loop's seconds."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    trainees = nn.ModuleList([TopKTrainee(x.shape[1], cfg, generator)])
    opt = torch.optim.Adam(trainees.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    running, step, n = [1.0], 0, cfg.tokens_per_step
    start = time.perf_counter()
    for b in range(cfg.n_tokens // n):
        xb, yb = x[b * n:(b + 1) * n], y[b * n:(b + 1) * n]
        if step == 0:
            trainees[0].initialize(xb, yb)
        for part in torch.arange(n).chunk(cfg.minibatches):
            _optimizer_step(trainees, opt, [xb[part]], [yb[part]], _lr(cfg, step), running)
            step += 1
        if cfg.resample_every and step // cfg.resample_every != (step - cfg.minibatches) // cfg.resample_every \
                and step < cfg.resample_until * cfg.n_steps:
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            trainees[0].resample_dead(xb, yb, opt, generator)
    return trainees[0], time.perf_counter() - start


@torch.no_grad()
def mechscope_transcoders(trainee: TopKTrainee, x: torch.Tensor, cfg: TrainConfig
                          ) -> tuple[PerLayerTranscoder, PerLayerTranscoder]:
    """``(TopK, JumpReLU)`` transcoders in raw units; the JumpReLU thresholds match the TopK firing
    rates on the last ``CALIBRATION_TOKENS`` training tokens (``calibrated_thresholds``)."""
    calib = x[-CALIBRATION_TOKENS:]
    pre = trainee.pre_activations(calib / trainee.in_scale)  # (n_calib, d_transcoder)
    vals, idx = pre.topk(cfg.k, dim=-1)
    fire_counts = torch.bincount(idx[vals > 0], minlength=cfg.d_transcoder).float()
    alive = trainee.last_fired < cfg.dead_after_tokens
    jumprelu = trainee.to_transcoder(calibrated_thresholds(pre, fire_counts, alive))
    topk = PerLayerTranscoder(jumprelu.d_model, cfg.d_transcoder, "topk", cfg.k, skip_connection=cfg.skip_connection)
    topk.load_state_dict({k: v for k, v in jumprelu.state_dict().items() if not k.startswith("activation_function")})
    return topk, jumprelu


@torch.no_grad()
def heldout_metrics(tc: PerLayerTranscoder, x: torch.Tensor, y: torch.Tensor, layer: int) -> LayerMetrics:
    """FVU, L0 and dead fraction of ``tc`` on held-out ``[n, d_model]`` pairs."""
    acc = MetricsAccumulator(layer, tc.d_transcoder)
    for rows in torch.arange(len(x)).split(4096):
        acts = tc.encode(x[rows])
        acc.update(y[rows], tc.decode(acts, x[rows]), acts)
    return acc.result()


# ----------------------------------------------------------------------------- sparsify
def run_sparsify(bench: BenchConfig, cfg: TrainConfig, paths: dict[str, Path], out: Path) -> dict:
    """Train with sparsify in its venv (the worker below); returns its JSON record."""
    if not SPARSIFY_PYTHON.exists():
        raise SystemExit(f"{SPARSIFY_PYTHON} is missing: run bash benchmarks/setup_sparsify.sh")
    spec = {
        "train_in": str(paths["train_in"]), "train_out": str(paths["train_out"]),
        "heldout_in": str(paths["heldout_in"]), "heldout_out": str(paths["heldout_out"]),
        "width": cfg.d_transcoder, "k": cfg.k, "lr": cfg.lr, "seed": cfg.seed, "threads": bench.threads,
        "seq_tokens": cfg.ctx_len - 1, "batch_sequences": cfg.batch_sequences // cfg.minibatches,
        "n_tokens": cfg.n_tokens, "warmup_steps": cfg.warmup_steps, "skip_connection": cfg.skip_connection,
        "heldout_tokens": bench.heldout_sequences * (cfg.ctx_len - 1), "auxk_alpha": cfg.aux_coef, "dead_feature_threshold": cfg.dead_after_tokens, "out": str(out),
    }
    (out / "spec.json").write_text(json.dumps(spec, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": str(bench.threads)}
    done = subprocess.run([str(SPARSIFY_PYTHON), __file__, WORKER_FLAG, str(out / "spec.json")], env=env,
                          stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the sparsify run failed (exit {done.returncode}):\n{done.stdout}")
    return json.loads((out / "result.json").read_text())


class _Replay(nn.Module):
    """The hooked layer of the stand-in model: its input is the cached MLP input rows, its output the
    cached MLP output rows of the same tokens."""

    def __init__(self, y: torch.Tensor):
        super().__init__()
        self.y, self.rows = y, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.y[self.rows]


class _ReplayModel(nn.Module):
    """What ``sparsify.Trainer`` reads of a Hugging Face model: ``config.num_hidden_layers``,
    ``base_model`` (holding one ``ModuleList`` of that length), ``device``, ``dummy_inputs`` and a
    forward on ``input_ids`` (here: row indices of the cached arrays, ``[batch, seq]``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        super().__init__()
        self.x = x
        self.layers = nn.ModuleList([_Replay(y)])
        self.config = types.SimpleNamespace(num_hidden_layers=1)

    base_model = property(lambda self: self)
    device = property(lambda self: self.x.device)
    dummy_inputs = property(lambda self: {"input_ids": torch.zeros(1, 2, dtype=torch.long)})

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.layers[0].rows = input_ids
        return self.layers[0](self.x[input_ids])  # (batch, seq, d_model)


def sparsify_worker(spec_path: str) -> None:
    """Body of the sparsify process (in ``.venv-sparsify``): train with ``sparsify.Trainer.fit()``,
    save the coder, measure its own held-out FVU, write ``result.json``."""
    from importlib.metadata import version

    from sparsify import SparseCoder, Trainer, TrainConfig as SparsifyTrainConfig, TranscoderConfig

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    x, y = _load(Path(spec["train_in"]))[:spec["n_tokens"]], _load(Path(spec["train_out"]))[:spec["n_tokens"]]
    seq = spec["seq_tokens"]
    dataset = [{"input_ids": torch.arange(i, i + seq)} for i in range(0, len(x), seq)]  # (seq,) row indices
    cfg = SparsifyTrainConfig(
        TranscoderConfig(num_latents=spec["width"], k=spec["k"], skip_connection=spec["skip_connection"]),
        batch_size=spec["batch_sequences"], optimizer="adam", lr=spec["lr"], lr_warmup_steps=spec["warmup_steps"],
        auxk_alpha=spec["auxk_alpha"], dead_feature_threshold=spec["dead_feature_threshold"],
        init_seeds=[spec["seed"]], layers=[0], log_to_wandb=False, save_dir=spec["out"],
    )
    trainer = Trainer(cfg, dataset, _ReplayModel(x, y))
    trainer.save = lambda: None  # no checkpoint inside the timed loop; saved below
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    (coder,) = trainer.saes.values()
    coder.save_to_disk(Path(spec["out"]) / "layers.0.mlp")
    n = spec["heldout_tokens"]
    hx, hy = _load(Path(spec["heldout_in"]))[:n], _load(Path(spec["heldout_out"]))[:n]
    with torch.no_grad():  # the squared error of sparsify's own forward, over the whole held-out set
        sq_err = sum(float((hy[r] - coder(x=hx[r], y=hy[r]).sae_out).double().pow(2).sum())
                     for r in torch.arange(n).split(4096))
    variance = float((hy.double() - hy.double().mean(0)).pow(2).sum())
    result = {"seconds": seconds, "tokens": len(x), "steps": trainer.global_step, "own_fvu": sq_err / variance,
              "version": version("eai-sparsify"), "torch": torch.__version__, "optimizer": type(trainer.optimizers[0]).__name__}
    (Path(spec["out"]) / "result.json").write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------- report
NOTES = [
    "input scaling: mechscope trains on x, y divided by their RMS norms; sparsify in raw units",
    "decoder: mechscope keeps decoder rows at unit norm; sparsify leaves a transcoder's decoder free",
    "init: mechscope random unit decoder, encoder 0.1 x decoder, ridge-fitted skip; sparsify nn.Linear encoder, "
    "centred bias, zero decoder, zero skip",
    "dead features: AuxK in both (same weight and window) but mechscope top-256 over residual energy, sparsify "
    "top-d_model/2 over target variance; only mechscope resamples dead features",
    "schedule: same warm-up; mechscope decays over the last 20% to 2% of peak, sparsify linearly to 0",
    "CPU only, float32, same thread count; tokens/s is the training loop alone (no model forward)",
]


def report(bench: BenchConfig, cfg: TrainConfig, rows: list[tuple[str, float | None, LayerMetrics]], theirs: dict) -> None:
    print(f"\nlayer {bench.layer} of {bench.model}: {cfg.n_tokens:,} training tokens, {rows[0][2].n_tokens:,} held-out; "
          f"width {cfg.d_transcoder}, k {cfg.k}, lr {cfg.lr:g} (Adam), {cfg.tokens_per_step // cfg.minibatches} "
          f"tokens a step ({cfg.n_steps} steps), warm-up {cfg.warmup_steps} steps, skip connection, AuxK weight "
          f"{cfg.aux_coef:g} after {cfg.dead_after_tokens:,} tokens, torch threads: {bench.threads}")
    print(f"eai-sparsify {theirs['version']} ({theirs['optimizer']}), torch {theirs['torch']}\n")
    print("| tool | tokens/s | held-out FVU | L0 | dead |")
    print("|---|---:|---:|---:|---:|")
    for name, rate, m in rows:
        shown = f"{rate:,.0f}" if rate is not None else "-"
        print(f"| {name} | {shown} | {m.fvu:.4f} | {m.l0:.1f} | {m.dead_fraction:.3f} |")
    print(f"\nsparsify's own forward gives held-out FVU {theirs['own_fvu']:.4f} (check of the shared evaluation)")
    print("not aligned:")
    for note in NOTES:
        print(f"- {note}")


def parse_args() -> tuple[BenchConfig, bool]:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=defaults.model, help=argparse.SUPPRESS)  # e.g. a tiny model directory
    for name in ("layer", "tokens", "width", "k", "heldout_sequences", "threads", "seed"):
        shown = "torch's thread count (OMP_NUM_THREADS)" if name == "threads" else getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {shown}")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes for a smoke run: {QUICK}")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    fields = {"threads": torch.get_num_threads(), **(QUICK if args.quick else {})}
    fields.update({k: v for k, v in vars(args).items() if v is not None and k not in ("quick", "json")})
    return BenchConfig(**fields), args.json


def main() -> None:
    bench, json_path = parse_args()
    torch.set_num_threads(bench.threads)
    cfg = bench.train_config()
    paths = cache_activations(bench, cfg)
    n_heldout = bench.heldout_sequences * (cfg.ctx_len - 1)
    hx, hy = _load(paths["heldout_in"])[:n_heldout], _load(paths["heldout_out"])[:n_heldout]
    x, y = _load(paths["train_in"])[:cfg.n_tokens], _load(paths["train_out"])[:cfg.n_tokens]
    trainee, seconds = train_mechscope(x, y, cfg)
    topk, jumprelu = mechscope_transcoders(trainee, x, cfg)
    del x, y
    with tempfile.TemporaryDirectory(dir=cache_root() / "bench") as tmp:
        theirs = run_sparsify(bench, cfg, paths, Path(tmp))
        sparsify_tc = load_sparsify(tmp).transcoders[0]
        rows = [
            ("mechscope (TopK)", cfg.n_tokens / seconds, heldout_metrics(topk, hx, hy, bench.layer)),
            (f"eai-sparsify {theirs['version']} (TopK)", theirs["tokens"] / theirs["seconds"],
             heldout_metrics(sparsify_tc, hx, hy, bench.layer)),
            ("mechscope (JumpReLU-calibrated, as saved)", None, heldout_metrics(jumprelu, hx, hy, bench.layer)),
        ]
    report(bench, cfg, rows, theirs)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"settings": dataclasses.asdict(bench), "sparsify": theirs, "notes": NOTES,
                                         "rows": [{"tool": n, "tokens_per_s": r, **m.as_dict()} for n, r, m in rows]},
                                        indent=1))


if __name__ == "__main__":
    sparsify_worker(sys.argv[2]) if WORKER else main()
