"""`python -m mechscope ...`: the command line, also under `torchrun --nproc-per-node N -m mechscope ...`.

Under torchrun the process group is set up first (gloo on the CPU, NCCL with CUDA; see distributed.py);
the commands that know data-parallel runs shard their examples, and rank 0 alone prints and writes.
"""

import sys


def run() -> None:
    from mechscope import distributed
    from mechscope.cli import main

    if distributed.setup() and not distributed.is_main():
        # Rank 0 alone shows progress and prints the results (errors still print on every rank).
        import os

        from mechscope.cli_common import console

        os.environ["TQDM_DISABLE"] = "1"
        console.quiet = True
    try:
        main()
    finally:
        if distributed.initialised():
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run())
