"""What every `mechscope` verb shares: the consoles, the common options, the check of --batch-size,
the one-line handling of user errors and interrupts, and loading --task or --data with the model.

A module of its own so that a verb group's module (`mechscope.lens.cli`, `mechscope.toys.cli`, ...) can
be imported before `mechscope.cli`, which imports them all."""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
import warnings

import typer
from rich.console import Console

from .errors import MechscopeError, MechscopeWarning

console = Console()
err_console = Console(stderr=True)


def _device_option():
    return typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu).")


def _task_option():
    return typer.Option(None, "--task", help="Built-in task: ioi, greater-than, winobias, induction.")


def _data_option():
    return typer.Option(None, "--data", help="A dataset JSONL (tokenized or text) instead of --task.")


def _model_option(help: str = "Model alias, .gguf, directory or hub id."):
    return typer.Option("smollm2-135m", "--model", "-m", help=help)


def _device_map_option():
    return typer.Option(None, "--device-map", help="Spread the model's layers over the available devices "
                        "through accelerate: auto | balanced | sequential (instead of --device).")


def _stream_option():
    return typer.Option(None, "--stream/--no-stream", help="Read --data from disk batch by batch instead of into "
                        "memory (default: streamed above 256 MiB).")


def _batch_option():
    return typer.Option(None, "--batch-size", help="Examples per forward pass (default: 64 on a GPU, 16 on the CPU).")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every clean-up runs."""


@contextlib.contextmanager
def _sigterm_interrupts():
    """While a command runs, SIGTERM (sent by `timeout`, Slurm, `docker stop`) stops it as Ctrl-C does:
    a KeyboardInterrupt, so unfinished outputs and temporaries are removed on the way out. A second
    SIGTERM during that clean-up is ignored. Signal handlers belong to the main thread: elsewhere
    (a command run from a worker thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _check_batch_size(batch_size: int | None) -> None:
    """--batch-size, when given, is a positive integer (checked before any model work)."""
    if batch_size is not None:
        from .errors import check_count

        check_count("batch_size", batch_size)


def data_parallel(fn):
    """Mark a command (under `_user_errors`) that every rank of a data-parallel run executes: its library
    calls shard the examples and all-reduce the sums, and it writes and prints its results only where
    `writes_results()` is True (rank 0). Commands without the mark run on rank 0 alone (see `_ranks`)."""
    fn.mechscope_data_parallel = True
    return fn


def writes_results() -> bool:
    """Whether this process writes and prints a command's results: rank 0 of a data-parallel run (or
    the only process). Data-parallel commands return before their writes where it is False."""
    from . import distributed

    return distributed.is_main()


def rank_device(device: str | None) -> str | None:
    """--device as given, or under torchrun (when not given) this rank's own device (cuda:LOCAL_RANK)."""
    from . import distributed

    if device is None and distributed.active():
        return str(distributed.local_device())
    return device


@contextlib.contextmanager
def _ranks(fn):
    """How a command runs under torchrun (or in a process group the caller set up); yields whether to
    run it here. No group: run it. A `data_parallel` command: run it on every rank, rank 0 alone
    printing (the other ranks' console is quiet; errors still print on every rank). Any other command:
    rank 0 runs it by itself (`distributed.alone()`: no sharding, no collectives) and the other ranks
    do nothing, so they print and write nothing."""
    from . import distributed

    if not distributed.active():
        yield True
        return
    if getattr(fn, "mechscope_data_parallel", False):
        from transformers.utils import logging as hf_logging

        quiet = console.quiet, err_console.quiet, hf_logging.is_progress_bar_enabled()
        if not distributed.is_main():  # mechscope's own bars check distributed.progress_enabled
            console.quiet = err_console.quiet = True
            hf_logging.disable_progress_bar()  # transformers' and the hub's (loading weights, downloads)
        try:  # _user_errors prints an error after this block, on every rank
            yield True
        finally:
            console.quiet, err_console.quiet = quiet[:2]
            if quiet[2]:
                hf_logging.enable_progress_bar()
        return
    if not distributed.is_main():
        yield False
        return
    with distributed.alone():
        yield True


def _user_errors(fn):
    """Turn a MechscopeError into a one-line message and exit status 2, and an interruption (Ctrl-C,
    SIGTERM) into a one-line message and status 130 or 143; print each distinct MechscopeWarning once,
    as a `warning:` line, when the command ends (other warnings as usual)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        seen: list[str] = []
        with warnings.catch_warnings(), _sigterm_interrupts():
            warnings.simplefilter("always", MechscopeWarning)
            show = warnings.showwarning

            def collect(message, category, *rest, **kw):
                if issubclass(category, MechscopeWarning):
                    if str(message) not in seen:
                        seen.append(str(message))
                else:
                    show(message, category, *rest, **kw)

            warnings.showwarning = collect
            try:
                with _ranks(fn) as here:
                    return fn(*args, **kwargs) if here else None
            except MechscopeError as exc:
                err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
                raise typer.Exit(code=2)
            except KeyboardInterrupt as exc:
                signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
                err_console.print(f"[bold red]interrupted[/] by {signum.name}; unfinished outputs were removed",
                                  highlight=False, soft_wrap=True)
                raise typer.Exit(code=128 + signum)
            finally:
                for message in seen if writes_results() else ():  # the other ranks' are rank 0's too
                    err_console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)

    return wrapper


def _task_or_data(task, data_file, model: str, n_task: int, seed: int, n_data: int | None = None,
                  device: str | None = None, device_map: str | None = None, stream: bool | None = False):
    """(loaded model, dataset) from --task (`n_task` generated pairs) or --data (its first `n_data`
    examples, or all): a tokenized dataset JSONL or a text JSONL (told apart by the dataset header, and
    tokenized with the model's tokenizer). A wrong choice, unknown task or unreadable or malformed file
    fails before the model loads. `stream` (True, or None and the file is larger than
    `streaming.STREAM_ABOVE`): --data becomes a `StreamingDataset`, read batch by batch, whose rows are
    checked as the command's first pass reaches them."""
    if data_file is not None and task is None and _streams(data_file, stream):
        from .data.streaming import stream_jsonl
        from .models import load_model

        with err_console.status(f"loading {model}"):
            bridge = load_model(model, device=device, device_map=device_map)
        dataset = stream_jsonl(data_file, bridge.tokenizer, n_ctx=bridge.cfg.n_ctx, limit=n_data)
        dataset.model = dataset.model or model
        return bridge, dataset
    from .data.dataset import DatasetError, PromptPairDataset
    from .data.text_jsonl import is_dataset_jsonl, read_text_jsonl, text_dataset
    from .models import load_model
    from .tasks import TASKS, make_task

    if (task is None) == (data_file is None):
        raise DatasetError("give either --task or --data")
    dataset = rows = None
    if task is not None and task not in TASKS:
        raise DatasetError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    if data_file is not None:
        if is_dataset_jsonl(data_file):
            dataset = PromptPairDataset.load(data_file)
            size = len(dataset)
        else:
            rows = read_text_jsonl(data_file)
            size = len(rows)
        if n_data is not None and n_data > size:
            raise DatasetError(f"--n {n_data} is larger than the {size} examples in {data_file}")
    with err_console.status(f"loading {model}"):
        # under torchrun each rank takes its own device, unless a device map places the layers
        bridge = load_model(model, device=device if device_map is not None else rank_device(device),
                            device_map=device_map)
    if rows is not None:
        dataset = text_dataset(rows[:n_data], bridge.tokenizer, data_file, n_ctx=bridge.cfg.n_ctx)
        dataset.model = model
    elif dataset is not None:
        if n_data is not None:
            dataset = dataset.subset(range(n_data))
    else:
        dataset = make_task(task, bridge.tokenizer, n_task, seed=seed)
        dataset.model = model
    return bridge, dataset


def _streams(data_file, stream: bool | None) -> bool:
    """Whether --data is streamed: --stream / --no-stream, else whether the file is larger than
    `streaming.STREAM_ABOVE` bytes."""
    if stream is not None:
        return bool(stream)
    from .data.streaming import STREAM_ABOVE

    try:
        return data_file.stat().st_size > STREAM_ABOVE
    except OSError:
        return False  # the loader names the problem
