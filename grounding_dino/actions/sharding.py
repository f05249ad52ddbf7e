"""Evaluate and inference on several processes (`evaluate.num_gpus`, `inference.num_gpus` > 1).

The launching process starts `num_gpus` worker processes (multiprocessing "spawn"), each on one GPU under CUDA
(`gpu_ids`, else GPUs 0..num_gpus-1) or sharing the CPU cores without. Each worker loads the model and runs a shard
of the single-process loader: whole batches, batch k on rank k % num_gpus (`ShardBatches`). So every image is seen
once, in the same batch, with the same padding as in a one-process run, and its detections are the ones that run
computes; an uneven last share needs no padding duplicates. Each worker sends its result back through its own pipe
and the launcher, which holds the results-folder lock and writes status.json, merges them and writes the outputs.

Why pipes and not torch.distributed (gloo / nccl): the ranks never exchange anything with each other, only with
the launcher, so a process group would add a rendezvous port, a collective timeout and NCCL for nothing; a worker
that dies is seen at once through its process sentinel, where a collective would wait for its timeout.

Failures: a worker's exception comes back with its traceback and is raised in the launcher as the same exception
(a UserError such as an unreadable image keeps its one-line message and exit code 2), after the other workers are
stopped. Workers exit on their own when the launcher is killed outright (no cleanup code runs then), so no shard
keeps running for nobody.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import pickle
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Sampler, SequentialSampler

from grounding_dino.config import ExperimentConfig
from grounding_dino.errors import UserError

PARENT_POLL_S = 1.0  # how soon a worker notices that its launcher is gone
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long


class ShardBatches(Sampler[List[int]]):
    """The batches of a sequential loader over `size` items that rank `rank` of `world` runs: batch k (items
    [k*batch_size, (k+1)*batch_size)) when k % world == rank. Together the ranks cover every item exactly once."""

    def __init__(self, size: int, batch_size: int, rank: int, world: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        self.size, self.batch_size, self.rank, self.world = size, batch_size, rank, world

    def __iter__(self) -> Iterator[List[int]]:
        for k, start in enumerate(range(0, self.size, self.batch_size)):
            if k % self.world == self.rank:
                yield list(range(start, min(start + self.batch_size, self.size)))

    def __len__(self) -> int:
        batches = -(-self.size // self.batch_size)
        return len(range(self.rank, batches, self.world))


def shard_loader(loader: DataLoader, rank: int, world: int) -> DataLoader:
    """`loader` (sequential, batched) restricted to the batches of `rank` (ShardBatches); itself when world is 1."""
    if world == 1:
        return loader
    if not isinstance(loader.sampler, SequentialSampler) or loader.batch_size is None:
        raise ValueError("only a sequential, batched loader can be sharded by batches")
    return DataLoader(loader.dataset, batch_sampler=ShardBatches(len(loader.dataset), loader.batch_size, rank, world),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


def check_processes(cfg: ExperimentConfig, section: str, path: str) -> int:
    """How many processes `section` (evaluate or inference) runs on: its num_gpus. Refuses num_gpus > 1 for an
    ONNX model or a TensorRT engine, which run in one ONNX Runtime / TensorRT process each, and a GPU list that does
    not match num_gpus."""
    options = getattr(cfg, section)
    processes = options.num_gpus
    if processes == 1:
        return 1
    from grounding_dino.predictor import backend_for

    backend = "tensorrt" if options.trt_engine else backend_for(path) if Path(path).is_file() else "torch"
    if backend != "torch":
        kind = {"onnx": "an ONNX model", "tensorrt": "a TensorRT engine"}.get(backend, f"a {backend} model")
        key = f"{section}.trt_engine" if options.trt_engine else f"{section}.checkpoint"
        raise UserError(f"{section}.num_gpus is {processes} but {key} {path} is {kind}, which runs in one process; "
                        f"several processes take a PyTorch checkpoint. Fix: set {section}.num_gpus to 1")
    rank_gpus(cfg, section)
    return processes


def rank_gpus(cfg: ExperimentConfig, section: str) -> List[Optional[int]]:
    """The GPU of each rank (None on CPU): gpu_ids when it lists num_gpus GPUs, GPUs 0..num_gpus-1 when it is the
    default [0], as train does."""
    options = getattr(cfg, section)
    n = options.num_gpus
    if not torch.cuda.is_available():
        return [None] * n
    ids = list(options.gpu_ids)
    if len(ids) == n:
        gpus = ids
    elif ids == [0]:
        gpus = list(range(n))
    else:
        raise UserError(f"{section}.gpu_ids {ids} lists {len(ids)} GPUs but {section}.num_gpus is {n}. Fix: make "
                        f"them agree, or leave {section}.gpu_ids at [0] to take GPUs 0..{n - 1}")
    visible = torch.cuda.device_count()
    if len(set(gpus)) != n or max(gpus) >= visible:
        raise UserError(f"{section}.num_gpus {n} needs distinct GPUs {gpus} but {visible} GPU(s) are visible "
                        f"(0..{visible - 1}). Fix: lower {section}.num_gpus or set {section}.gpu_ids")
    return list(gpus)


class WorkerFailed(RuntimeError):
    """A worker process's traceback, chained under the exception it raised when that is re-raised here."""


def run_sharded(target: Callable[..., Any], cfg: ExperimentConfig, section: str, processes: int,
                *args: Any) -> List[Any]:
    """`target(cfg, rank, world, *args)` in `processes` spawned worker processes, cfg's `section`.gpu_ids set to the
    rank's GPU; returns their results in rank order. `target` must be a module-level function (it is pickled by
    name), `args` picklable."""
    gpus = rank_gpus(cfg, section)
    threads = max(1, _cpu_count() // processes)
    context = multiprocessing.get_context("spawn")
    workers, pipes = [], []
    done = False
    try:
        for rank, gpu in enumerate(gpus):
            rank_cfg = cfg if gpu is None else dataclasses.replace(
                cfg, **{section: dataclasses.replace(getattr(cfg, section), gpu_ids=[gpu])})
            receive, send = context.Pipe(duplex=False)
            worker = context.Process(target=_worker, name=f"{section}-rank{rank}",
                                     args=(target, rank_cfg, rank, processes, args, threads, os.getpid(), send))
            worker.start()
            send.close()  # the worker holds the only writing end, so its death reads as EOF here
            workers.append(worker)
            pipes.append(receive)
        results = _collect(workers, pipes, section)
        done = True
        return results
    finally:
        _stop(workers, wait=done)
        for pipe in pipes:
            pipe.close()


def _collect(workers, pipes, section: str) -> List[Any]:
    results: List[Any] = [None] * len(workers)
    waiting = {pipe: rank for rank, pipe in enumerate(pipes)}
    while waiting:
        for pipe in multiprocessing.connection.wait(list(waiting)):
            rank = waiting.pop(pipe)
            try:
                ok, payload = pipe.recv()
            except EOFError:
                workers[rank].join(STOP_GRACE_S)
                raise RuntimeError(f"{section} process {rank} of {len(workers)} ended with exit code "
                                   f"{workers[rank].exitcode} without a result (killed, e.g. out of memory?)") from None
            if ok:
                results[rank] = payload
                continue
            error, trace = payload
            if error is None:
                raise WorkerFailed(f"{section} process {rank} of {len(workers)} failed:\n{trace}")
            if isinstance(error, UserError):
                raise error  # the user's to fix: its message alone, as in a one-process run
            raise error from WorkerFailed(f"{section} process {rank} of {len(workers)} failed:\n{trace}")
    return results


def _stop(workers, wait: bool) -> None:
    """End the workers: after success let them exit on their own first (a worker terminated while it exits leaves
    its semaphores to the resource tracker, which warns); after a failure stop them at once."""
    deadline = time.monotonic() + STOP_GRACE_S
    for worker in workers if wait else ():
        worker.join(max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            worker.kill()
            worker.join()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _worker(target, cfg: ExperimentConfig, rank: int, world: int, args: tuple, threads: int, parent: int,
            pipe) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)  # the ranks share the cores; each taking them all would oversubscribe them
    try:
        reply = (True, target(cfg, rank, world, *args))
    except BaseException as err:  # noqa: BLE001 - everything goes back to the launcher, which decides
        reply = (False, (_picklable(err), traceback.format_exc()))
    try:
        pipe.send(reply)
    except (BrokenPipeError, OSError):
        pass  # the launcher is gone or stopped waiting after another rank failed
    finally:
        pipe.close()


def _picklable(error: BaseException) -> Optional[BaseException]:
    """`error` when it survives pickling (rebuilt from its args on the other side), else None."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any failure means: send the traceback text alone
        return None


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)
