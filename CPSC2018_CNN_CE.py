"""Train the paper's CNN with plain cross-entropy (the baseline; PROTOCOL section 5, CE).

    python CPSC2018_CNN_CE.py                 # the paper's settings
    python CPSC2018_CNN_CE.py --preset demo   # synthetic data (`reproduce.py --preset demo` makes it)
    python CPSC2018_CNN_CE.py --epochs 2 --max_batches 5 --run_name quick_look

Every setting is a flag: TRAINING's below and the rest of config.TRAIN_DEFAULTS (data_dir, seed, ...).
"""
import sys

import torch.nn.functional as F

from training import harness

# The settings to edit; each is also a flag (types and presets: config.py). Shared (PROTOCOL section 5):
TRAINING = dict(epochs=70, batch_size=64, lr=1e-3)
# CE has no hyperparameters of its own.
HYPERPARAMETERS = {}
WHOLE_NUMBERS = ()


def loss_fn(model, x, y, mask, epoch, cfg):
    loss = F.cross_entropy(model(x, mask), y)
    return loss, {}


if __name__ == "__main__":
    sys.exit(harness.main(sys.modules[__name__]))
