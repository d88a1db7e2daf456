"""mix_datasets on the session's Ray head: the old share of a 10,000-row stream is within 2%."""

import pytest

pytestmark = pytest.mark.integration



def test_mix_datasets_old_share_and_determinism(ray_local):
    import ray.data

    from jobs.data.mix import mix_datasets

    def stream(seed):
        new = ray.data.range(8_000, override_num_blocks=40).map_batches(
            lambda b: {"src": [0] * len(b["id"]), "id": b["id"]}
        )
        old = ray.data.range(500, override_num_blocks=5).map_batches(
            lambda b: {"src": [1] * len(b["id"]), "id": b["id"]}
        )
        ds = mix_datasets(new, old, 0.2, seed, new_rows=8_000, old_rows=500)
        return [(int(s), int(i)) for b in ds.iter_batches(batch_size=1000) for s, i in zip(b["src"], b["id"])]

    rows = stream(3)
    assert len(rows) >= 9_500  # a full pass over new plus its 20% of (repeated) old rows
    old = sum(s for s, _ in rows[:10_000])
    assert abs(old / min(10_000, len(rows)) - 0.2) <= 0.02
    assert rows == stream(3)
