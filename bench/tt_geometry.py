"""Which TTLinear geometry approximates trained weights best at equal parameters, and what it costs.

For 12 Linear layers of all-MiniLM-L6-v2 (query, attention output, intermediate, output of encoder
layers 0, 3, 5; loaded offline through tensorfold.zoo.minilm) this fits TT-SVD at 1/2, 1/4 and 1/10 of
the dense parameters with each geometry and reports the relative weight error ||W - W~|| / ||W||, the
relative output error ||X (W - W~)^T|| / ||X W^T|| on 2048 calibration tokens, and the multiply-adds of
the cheapest contraction relative to the dense layer at 32 and 1 rows. LowRankLinear (truncated SVD)
at the same parameters is listed for reference.

    .venv/bin/python bench/tt_geometry.py                 # the table (about a minute on 2 cores)
    .venv/bin/python bench/tt_geometry.py --search 3.attention.self.query 0.5
        # every 2- and 3-core geometry (dims >= 2) of one layer: the best ones and where skewed/balanced rank
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from tensorfold.nn import LowRankLinear, TTLinear, dense_params
from tensorfold.zoo import minilm

FRACTIONS = (0.5, 0.25, 0.1)
GEOMETRIES = {"skewed": {}, "balanced": {"geometry": "balanced"}, "skewed, 2 cores": {"n_cores": 2},
              "balanced, 2 cores": {"n_cores": 2, "geometry": "balanced"}}
LAYERS = [f"0.model.encoder.layer.{i}.{s}" for i in (0, 3, 5)
          for s in ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense")]


def capture(n_tokens: int = 2048) -> dict:
    """name -> (dense float64 copy, input rows) for LAYERS, on the calibration text."""
    torch.manual_seed(0)
    model = minilm.load()
    modules = dict(model.named_modules())
    seen = {name: [] for name in LAYERS}
    hooks = [modules[name].register_forward_hook(
        lambda mod, inp, out, name=name: seen[name].append(inp[0].detach().reshape(-1, inp[0].shape[-1])))
        for name in LAYERS]
    with torch.no_grad():
        for batch in minilm.calibration(128, seed=0):
            model(batch)
    for h in hooks:
        h.remove()
    out = {}
    for name in LAYERS:
        X = torch.cat(seen[name])
        X = X[torch.randperm(X.shape[0])[:n_tokens]].double()
        out[name] = (modules[name].double(), X)
    return out


def errors(dense, X, approx_weight) -> tuple[float, float]:
    W = dense.weight.detach()
    D = approx_weight - W
    return float(D.norm() / W.norm()), float((X @ D.T).norm() / (X @ W.T).norm())


def table(layers: dict) -> None:
    rows = []
    for name, (dense, X) in layers.items():
        i, o = dense.in_features, dense.out_features
        for frac in FRACTIONS:
            for geo, opts in GEOMETRIES.items():
                layer = TTLinear.from_dense(dense, frac, **opts)
                we, oe = errors(dense, X, layer.dense_weight().detach())
                rows.append((frac, geo, name, layer.n_params, we, oe, layer.flops((32, i)) / (32 * i * o),
                             layer.flops((1, i)) / (i * o)))
            lr = LowRankLinear.from_dense(dense, frac)
            we, oe = errors(dense, X, lr.to_dense().weight.detach())
            rows.append((frac, "svd (LowRankLinear)", name, lr.n_params, we, oe, lr.flops((32, i)) / (32 * i * o),
                         lr.flops((1, i)) / (i * o)))
    print(f"{'fraction':>8s}  {'geometry':20s} {'weight err':>10s} {'output err':>10s} {'(max)':>6s} "
          f"{'out err / balanced':>18s} {'MACs/dense b=32':>15s} {'b=1':>5s}")
    for frac in FRACTIONS:
        base = {r[2]: r[5] for r in rows if r[0] == frac and r[1] == "balanced"}
        for geo in [*GEOMETRIES, "svd (LowRankLinear)"]:
            sel = [r for r in rows if r[0] == frac and r[1] == geo]
            rel = [r[5] / base[r[2]] for r in sel]
            print(f"{frac:8}  {geo:20s} {statistics.mean(r[4] for r in sel):10.3f} "
                  f"{statistics.mean(r[5] for r in sel):10.3f} {max(r[5] for r in sel):6.3f} "
                  f"{min(rel):8.2f}-{max(rel):4.2f} ({statistics.mean(rel):.2f}) "
                  f"{statistics.mean(r[6] for r in sel):15.2f} {statistics.mean(r[7] for r in sel):5.2f}")
    print("(means over the 12 layers; 'out err / balanced': per-layer range and mean of the ratio)")


def _factorisations(n: int, d: int):
    if d == 1:
        if n >= 2:
            yield (n,)
        return
    for f in range(2, n + 1):
        if n % f == 0:
            for rest in _factorisations(n // f, d - 1):
                yield (f, *rest)


def search(layers: dict, name: str, frac: float) -> None:
    dense, X = layers[f"0.model.encoder.layer.{name}"]
    i, o = dense.in_features, dense.out_features
    budget = frac * dense_params(dense)
    found = []
    for d in (2, 3):
        for a, b in itertools.product(_factorisations(i, d), _factorisations(o, d)):
            rank = TTLinear.resolve_rank(dense, frac, in_dims=a, out_dims=b)
            cost = TTLinear.cost(dense, rank, (32, i), in_dims=a, out_dims=b)
            if cost.params < 0.9 * budget:  # rank steps too coarse to use the budget: not comparable
                continue
            layer = TTLinear.from_dense(dense, rank, in_dims=a, out_dims=b)
            found.append((errors(dense, X, layer.dense_weight().detach())[1], cost.flops / (32 * i * o), a, b, rank))
    found.sort()
    print(f"{name} at {frac}: {len(found)} geometries within 10% of the budget; best by output error:")
    for err, macs, a, b, rank in found[:8]:
        print(f"  output err {err:.4f}  MACs/dense {macs:5.2f}  in {a} out {b} rank {rank}")
    for geo, opts in list(GEOMETRIES.items())[:2]:
        layer = TTLinear.from_dense(dense, frac, **opts)
        err = errors(dense, X, layer.dense_weight().detach())[1]
        place = sum(f[0] < err for f in found) + 1
        print(f"  {geo}: output err {err:.4f}, place {place} of {len(found)} (best {found[0][0]:.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search", nargs=2, metavar=("LAYER", "FRACTION"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    layers = capture()
    if args.search:
        search(layers, args.search[0], float(args.search[1]))
    else:
        table(layers)


if __name__ == "__main__":
    main()
