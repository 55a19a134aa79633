"""`python -m mechscope ...`: the command line, also under `torchrun --nproc-per-node N -m mechscope ...`.

Under torchrun the process group is set up first (gloo on the CPU, NCCL with CUDA; see distributed.py).
The data-parallel commands (circuit, curves, patch sweep, sae train) run on every rank, each rank on
its shard of the examples or sequences, and rank 0 alone prints and writes; every other command runs on
rank 0 by itself while the other ranks exit at once (cli_common._ranks).
"""

import sys


def run() -> None:
    # Rank 0 alone prints and shows progress: each command sees to it (cli_common._ranks).
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
