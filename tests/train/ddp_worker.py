"""One rank of the two-process DDP test: train from a config file, save this rank's final weights."""

import json
import sys

import torch

from dewey_train.config import config_from_dict
from dewey_train.trainer import train

if __name__ == "__main__":
    cfg = config_from_dict(json.loads(open(sys.argv[1]).read()))
    state = {}
    train(cfg, show_progress=False, log=lambda message: None, state_out=state)
    torch.save({k: v.detach().clone() for k, v in state["student"].state_dict().items()}, sys.argv[2])
    torch.distributed.destroy_process_group()
