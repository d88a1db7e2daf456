"""Elastic workers (`resources.workers: {min, max}`): the spec form, what the plan says, the
gradient accumulation that keeps the global batch at every size, the kinds that refuse it, and
the Ray Train ScalingConfig the job builds."""

import copy

import pytest

from launcher.errors import ConfigError
from launcher.spec import validate
from tests.unit.test_spec import GOOD


def _spec(**resources):
    spec = copy.deepcopy(GOOD)
    spec["resources"] = {**spec.get("resources", {}), **resources}
    return spec


def test_a_range_is_min_and_max_workers_and_one_size_is_not_elastic():
    res = validate(_spec(workers={"min": 1, "max": 4})).resources
    assert (res.min_workers, res.workers) == (1, 4)
    assert validate(_spec(workers={"min": 2, "max": 2})).resources.min_workers is None
    assert validate(_spec(workers=3)).resources.min_workers is None


@pytest.mark.parametrize("workers, says", [
    ({"min": 5, "max": 4}, "resources: workers: min 5 is above max 4; swap them, or give one number"),
    ({"min": 1}, "resources: workers: {'min': 1} is not {min: N, max: M}; give both, or one number"),
])
def test_a_bad_range_is_one_line_naming_it(workers, says):
    with pytest.raises(ConfigError) as bad:
        validate(_spec(workers=workers))
    assert says in str(bad.value)


def test_only_the_torch_finetune_runs_elastic_workers():
    with pytest.raises(ConfigError, match=r"resources.workers: \{min, max\} \(elastic workers\) runs on kind "
                                          r"finetune's torch engine only, not finetune's deepspeed"):
        validate({**_spec(workers={"min": 1, "max": 2}), "engine": "deepspeed"})


def test_the_global_batch_is_kept_at_every_size_by_accumulation():
    from jobs.components import accumulation_for

    assert [accumulation_for(2, 4, n) for n in (4, 2, 1)] == [2, 4, 8]  # 8 micro-batches in all, every size
    assert accumulation_for(1, 4, 3) == 2  # 4 does not divide by 3: rounded up (6 micro-batches)
    assert accumulation_for(1, 2, 2) == 1


def test_the_job_asks_ray_train_for_the_range_and_the_plan_says_how_it_sizes(tmp_path):
    from jobs.components import ray_train_configs
    from launcher.cli.plan import describe
    from launcher.jobplan import plan

    spec = validate({**_spec(workers={"min": 1, "max": 4}), "train": {**GOOD.get("train", {}), "max_steps": 10}})
    scaling = ray_train_configs(spec.resources, "r", {"storage_path": str(tmp_path)}, 1)["scaling_config"]
    assert scaling.num_workers == (1, 4) and scaling.elasticity_enabled
    fixed = ray_train_configs(validate(_spec(workers=2)).resources, "r", {"storage_path": str(tmp_path)}, 1)
    assert fixed["scaling_config"].num_workers == 2

    job = plan(spec, "ray", preflight=False)
    assert job.resources["min_workers"] == 1 and job.resources["workers"] == 4
    shown = describe(job)
    micro, accumulation = spec.train.micro_batch, spec.train.grad_accumulation
    assert "workers       1-4 x" in shown
    assert (f"global batch {micro * accumulation * 4} at every size, by gradient accumulation "
            f"({accumulation} on 4 workers, {accumulation * 4} on 1") in shown


def test_live_capacity_refuses_only_below_min_workers():
    from launcher.capacity import Cluster, check

    cluster = Cluster("http://h:8265", [{"CPU": 2.0}])
    assert check(cluster, {"workers": 4, "min_workers": 1, "cpus_per_worker": 1}) == []
    with pytest.raises(Exception, match="4 workers of"):
        check(cluster, {"workers": 4, "cpus_per_worker": 1})


def test_custom_resources_per_worker_go_to_ray_train_and_a_cluster_without_them_refuses_the_job(tmp_path):
    from jobs.components import ray_train_configs
    from launcher.capacity import Cluster, check

    spec = validate(_spec(custom_per_worker={"trainer": 1}))
    scaling = ray_train_configs(spec.resources, "r", {"storage_path": str(tmp_path)}, 1)["scaling_config"]
    assert scaling.resources_per_worker == {"CPU": spec.resources.cpus_per_worker, "GPU": 0, "trainer": 1}
    job = {"workers": 2, "cpus_per_worker": 0.5, "custom_per_worker": {"trainer": 1}}
    nodes = [{"CPU": 2.0}, {"CPU": 1.0, "trainer": 1.0}, {"CPU": 1.0, "trainer": 1.0}]
    assert check(Cluster("http://h:8265", nodes, free={"CPU": 4.0}), job) == []  # the free check: CPU only
    with pytest.raises(Exception, match=r"a worker asks \{CPU: 0.5, trainer: 1\}, and no node .* has that "
                                        r"\(1 x \{CPU: 2\}\).* / custom_per_worker or add"):
        check(Cluster("http://h:8265", [{"CPU": 2.0}]), job)
    with pytest.raises(ConfigError, match="custom_per_worker: GPU is not a custom resource; use gpus_per_worker"):
        validate(_spec(custom_per_worker={"GPU": 1}))
