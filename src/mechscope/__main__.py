"""`python -m mechscope ...`: the command line, also under `torchrun --nproc-per-node N -m mechscope ...`.

Under torchrun the process group is set up first (gloo on the CPU, NCCL with CUDA; see distributed.py).
The data-parallel commands (circuit, curves, patch sweep, sae train) run on every rank, each rank on
its shard of the examples or sequences, and rank 0 alone prints and writes; every other command runs on
rank 0 by itself while the other ranks exit at once (cli_common._ranks).
"""

import os
import sys


def run() -> None:
    if os.environ.get("RANK", "0") != "0" and os.environ.get("WORLD_SIZE"):
        # Progress bars on rank 0 only: tqdm reads TQDM_DISABLE when it is imported (torch imports it),
        # so before any import. The commands quiet the other ranks' console themselves (cli_common._ranks).
        os.environ["TQDM_DISABLE"] = "1"
    from mechscope import distributed
    from mechscope.cli import main

    distributed.setup()
    try:
        main()
    finally:
        if distributed.initialised():
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run())
