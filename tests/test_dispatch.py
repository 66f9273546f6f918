"""Which worker gets the next shard: a free worker first, a busy worker's second slot only while
the queue has a shard for every worker (no shard waits behind another at the end of a run)."""
from pipeline.runner import _next_slot


def dispatch(idle: list, inflight: dict, queue: list) -> list:
    """Shards given out, as label_shards does, until a shard must wait."""
    given = []
    while queue and idle:
        actor = _next_slot(idle, inflight, len(queue))
        if actor is None:
            break
        shard = queue.pop(0)
        inflight[shard] = (actor, shard)
        given.append((actor, shard))
    return given


def test_every_worker_gets_a_shard_before_any_gets_two():
    idle = ["b", "a", "b", "a"]  # two slots each
    assert dispatch(idle, {}, ["s1", "s2", "s3", "s4", "s5"]) == [("a", "s1"), ("b", "s2"), ("a", "s3"), ("b", "s4")]


def test_at_the_end_of_a_run_a_shard_waits_for_a_free_worker():
    inflight = {"s1": ("a", "s1"), "s2": ("b", "s2")}
    assert dispatch(["a", "b"], inflight, ["s3"]) == []  # both busy, one shard left: it waits
    del inflight["s2"]  # b is done
    assert dispatch(["a", "b", "b"], inflight, ["s3"]) == [("b", "s3")]


def test_a_busy_workers_second_slot_is_used_while_the_queue_is_long():
    inflight = {"s1": ("a", "s1"), "s2": ("b", "s2")}
    assert dispatch(["a", "b"], inflight, ["s3", "s4", "s5"]) == [("b", "s3"), ("a", "s4")]


def test_one_worker_always_holds_two():
    inflight = {"s1": ("a", "s1")}
    assert dispatch(["a"], inflight, ["s2"]) == [("a", "s2")]
