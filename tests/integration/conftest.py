import pytest


@pytest.fixture(scope="module")
def ray_local(ray_head):
    """This test process connected to the session's Ray head (Ray Data runs on it), for one module."""
    import ray

    ray.init(address=ray_head.gcs_address, log_to_driver=False)
    yield ray
    ray.shutdown()
