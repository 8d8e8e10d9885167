"""Devices: the one parser for `--devices`, and which GPU each worker gets.

Why one module: the search engine, the evaluator pool and `opsearch evaluate` all read the same
flag; they must agree on what '2', '0,1' and 'auto' mean. No torch import at module level: the
launcher decides a worker's device before that worker's CUDA starts, and counting devices goes
through NVML where it can (lightning_fabric's `num_cuda_devices`), which does not initialise CUDA.

Pinning: a worker given GPU k runs with ``CUDA_VISIBLE_DEVICES=k`` in its environment from its
first instruction (a spawned or launched process, never a fork), so inside it the device is
index 0 and no other GPU's memory is touched.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Mapping, Sequence

from opsearch.errors import UserError

GPU_ACCELERATORS = ("gpu", "cuda", "auto")
VISIBLE = "CUDA_VISIBLE_DEVICES"


def parse_devices(text: Any) -> Any:
    """Lightning's `devices` from a flag or config value: '2' -> 2, '0,1' -> [0, 1],
    'auto' / -1 -> 'auto', a list stays a list of ints; None stays None."""
    if text is None:
        return None
    if isinstance(text, bool):
        raise UserError(f"--devices: expected a count, a list like 0,1, or auto; got {text!r}")
    if isinstance(text, int):
        return "auto" if text == -1 else text
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        s = str(text).strip()
        if s in ("auto", "-1"):
            return "auto"
        if "," not in s:
            try:
                return int(s)
            except ValueError:
                raise UserError(f"--devices: expected a count, a list like 0,1, or auto; "
                                f"got {text!r}") from None
        items = [t for t in s.split(",") if t.strip()]
    try:
        ids = [int(str(t).strip()) for t in items]
    except ValueError:
        raise UserError(f"--devices: expected a count, a list like 0,1, or auto; got {text!r}") from None
    if any(i < 0 for i in ids):
        raise UserError(f"--devices {text}: device indices are >= 0")
    return ids


def cuda_device_count() -> int:
    """CUDA devices this process may use, counted without initialising CUDA (fork-safe)."""
    try:
        from lightning_fabric.accelerators.cuda import num_cuda_devices
    except ImportError:  # pragma: no cover - Lightning is a dependency
        import torch
        return torch.cuda.device_count()
    return num_cuda_devices()


def gpu_ids(accelerator: str, devices: Any, count: int | None = None) -> list[int] | None:
    """The GPU indices a run uses (None: it runs on CPU).

    `devices` as the flag gives it: a count takes the first ones, a list names them, 'auto' takes
    all. Asking for a GPU accelerator on a machine without one, or for a device that does not
    exist, is a UserError; with accelerator 'auto' a machine without GPU runs on CPU.
    """
    if accelerator not in GPU_ACCELERATORS:
        return None
    n = cuda_device_count() if count is None else count
    if n == 0:
        if accelerator == "auto":
            return None
        raise UserError(f"accelerator {accelerator!r} asked for, but no CUDA device is visible "
                        f"({VISIBLE}={os.environ.get(VISIBLE, '<unset>')!s})")
    wanted = parse_devices(devices)
    if wanted in ("auto", None):
        return list(range(n))
    if isinstance(wanted, int):
        if not 1 <= wanted <= n:
            raise UserError(f"--devices {devices}: this machine has {n} CUDA device(s)")
        return list(range(wanted))
    bad = [i for i in wanted if not 0 <= i < n]
    if bad:
        raise UserError(f"--devices {devices}: no CUDA device {bad[0]} (this machine has {n})")
    return list(wanted)


def device_for_worker(ids: Sequence[int] | None, index: int) -> int | None:
    """Worker `index`'s device: workers go round the devices (K per device for K x devices)."""
    return None if not ids else ids[index % len(ids)]


def physical_id(index: int, environ: Mapping[str, str] | None = None) -> str:
    """What to put in a child's CUDA_VISIBLE_DEVICES for this process's device `index`: when this
    process already sees a subset (CUDA_VISIBLE_DEVICES=2,3), index 1 is device 3."""
    environ = os.environ if environ is None else environ
    visible = [v.strip() for v in environ.get(VISIBLE, "").split(",") if v.strip()]
    if visible:
        if index >= len(visible):
            raise UserError(f"device {index} is not visible ({VISIBLE}={environ.get(VISIBLE)})")
        return visible[index]
    return str(index)


def worker_environment(device: int | None, environ: Mapping[str, str] | None = None,
                       threads: int = 1) -> dict[str, str]:
    """The environment of a worker process: pinned to `device` (a GPU index of this process, or
    None for CPU) and to `threads` CPU threads, before anything in it starts."""
    env = dict(os.environ if environ is None else environ)
    if device is not None:
        env[VISIBLE] = physical_id(device, env)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    return env


def describe(device: int | None, environ: Mapping[str, str] | None = None) -> str:
    """What a worker trains on, as `opsearch status` shows it."""
    if device is None:
        return "cpu"
    environ = os.environ if environ is None else environ
    visible = environ.get(VISIBLE)
    return f"cuda:{device}" + (f" ({VISIBLE}={visible})" if visible else "")


@contextlib.contextmanager
def environment(env: Mapping[str, str]):
    """Run the block with exactly `env` as os.environ (a child started in it inherits it)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
