"""Settings every test shares.

- No downloads: the Hugging Face hub is offline for every test (and for the processes
  the tests start), so a test that would fetch a file fails instead of hiding a download.
- One CPU thread for torch, unless OMP_NUM_THREADS says otherwise. The models in these
  tests are tiny; extra threads only spin-wait for each other, and far worse when another
  process is busy. Measured on a 2-core machine beside a busy process: the 6-step
  training run of test_training.py takes 5 s on one thread and 110-160 s on two.

W&B is not configured here: the tests of W&B behaviour set its environment themselves.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
_one_thread = "OMP_NUM_THREADS" not in os.environ
if _one_thread:
    os.environ["OMP_NUM_THREADS"] = "1"  # read by torch on import, and by subprocesses

import torch  # noqa: E402

if _one_thread:
    torch.set_num_threads(1)  # in case torch was imported before this file


import pytest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left_running():
    """Shut down a Ray that a test module's run loop started, so the next module starts its
    own, with its own working directory and path for the actors (reward modules written
    to a temporary folder are found through that path)."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module of tiny models, whatever OMP_NUM_THREADS says: they
    run fastest so, as more threads only spin-wait when the CPUs are busy (measured on
    test_model.py: 4 s on one thread, over 100 s on two beside another busy process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_deepspeed_process_group():
    """The DeepSpeed backend sets the single-process rendezvous variables and starts a gloo
    group; both are undone after the module, so later tests (accelerate, TRL) see a plain process."""
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    before = {name: os.environ.get(name) for name in names}
    yield
    if torch.distributed.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
