"""Shared test settings: tests import the tiny model table from this folder; one intra-op thread, since tiny
models gain nothing from more and a shared 2-core machine loses a lot to oversubscription."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)
