"""(Re)train the built-in vision models and write the weights shipped in src/tensorfold/zoo/weights/.

    .venv/bin/python examples/train_vision.py                 # both models
    .venv/bin/python examples/train_vision.py digits-cnn      # one model
    .venv/bin/python examples/train_vision.py --out /tmp/w    # somewhere else

Takes a few seconds (digits-cnn) and one to two minutes (resnet20-shapes) on 2 CPU cores. The weights
are a pure function of the seed and the recipe in tensorfold.zoo.vision.SPECS (up to CPU float
non-determinism in the BLAS), and the recorded test accuracy is stored in the file's metadata.
"""

from __future__ import annotations

import argparse

import torch

from tensorfold.zoo.vision import WEIGHTS_DIR, names, save_weights, train_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=names(), help="models to train (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epoch count")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="folder for the .safetensors files")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        model, record = train_reference(name, seed=args.seed, epochs=args.epochs)
        path = save_weights(model, name, record, args.out)
        print(f"{name}: test accuracy {record['test_accuracy']:.4f} in {record['train_seconds']} s -> {path} "
              f"({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
