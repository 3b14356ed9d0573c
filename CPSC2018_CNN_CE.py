"""Train the paper's CNN with plain cross-entropy (the baseline; PROTOCOL section 5, CE).

    python CPSC2018_CNN_CE.py                 # the paper's settings
    python CPSC2018_CNN_CE.py --preset demo   # the synthetic demo dataset, a few minutes on a CPU
    python CPSC2018_CNN_CE.py --epochs 2 --max_batches 5 --run_name quick_look

Every setting of harness.TRAIN_DEFAULTS (epochs, lr, batch_size, data_dir, ...) is a flag.
"""
import sys

import torch.nn.functional as F

import harness

# CE has no hyperparameters of its own: the shared ones (Adam, lr 1e-3, 70 epochs,
# batch 64, random pad, class-balanced sampler) are in harness.TRAIN_DEFAULTS.
HYPERPARAMETERS = {}


def loss_fn(model, x, y, mask, epoch, cfg):
    loss = F.cross_entropy(model(x, mask), y)
    return loss, {}


def run_name(cfg):
    return "CE"


if __name__ == "__main__":
    sys.exit(harness.main("CE", loss_fn, HYPERPARAMETERS, run_name))
