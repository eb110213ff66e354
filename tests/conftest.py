"""Shared fixtures: a small synthetic dataset, a local Ray instance."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A tiny synthetic dataset in the generic layout (2 categories)."""
    from ncd.synthetic import SyntheticSpec, write_dataset

    root = tmp_path_factory.mktemp("demo")
    return write_dataset(root, SyntheticSpec(images_per_family=3, normal_images=3, image_size=96, seed=1))


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance with 2 CPUs for the whole session."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()
