"""Which worker gets the next shard: a free worker first, a busy worker's second slot only while
the queue has a shard for every worker (no shard waits behind another at the end of a run)."""
from types import SimpleNamespace

import pytest
from ray.exceptions import RayActorError

from pipeline.driver import dispatch as dispatcher
from pipeline.config import load_config
from pipeline.driver.records import RunSummary
from pipeline.driver.dispatch import _next_slot
from pipeline.io.shards import Shard


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


# -- label_shards itself, on a fake Ray whose actors a poison shard kills ------------------------

class _Ref:
    def __init__(self, actor, shard=None, ok=False):
        self.actor, self.shard, self.ok = actor, shard, ok


class _Actor:
    def __init__(self, world, name):
        self.world, self.name, self.dead, self.holding = world, name, False, set()
        self.label_shard = SimpleNamespace(remote=lambda shard, attempt, redo: world.submit(self, shard, redo))
        self.describe = SimpleNamespace(remote=lambda: _Ref(self))

    def __repr__(self):
        return self.name


class _FakeRay:
    """Tasks finish oldest first (or in ``order``); a poison shard kills the actor running it, and
    so every other task of that actor, except those in ``done_early`` (finished before the death,
    though the driver may hear of them after it); replacement actors start at once."""

    def __init__(self, poison=(), order=None, done_early=()):
        self.poison, self.order, self.done_early = set(poison), order, set(done_early)
        self.log, self.actors = [], 0  # (actor, shard, shards the actor held already)
        self.redos = []  # per entry of the log: whether it was given out as a redo

    def new_actor(self):
        self.actors += 1
        return _Actor(self, f"actor{self.actors}")

    def submit(self, actor, shard, redo=False):
        assert not actor.dead, f"{shard.shard_id} sent to {actor}, which was replaced"
        self.log.append((actor.name, shard.shard_id, sorted(actor.holding)))
        self.redos.append(redo)
        actor.holding.add(shard.shard_id)
        return _Ref(actor, shard, ok=shard.shard_id in self.done_early)

    def wait(self, refs, num_returns=1):
        starting = [r for r in refs if r.shard is None]
        ref = starting[0] if starting else (self.order(refs) if self.order else refs[0])
        if ref.shard is not None and ref.shard.shard_id in self.poison:
            ref.actor.dead = True
        return [ref], []

    def get(self, ref):
        if ref.shard is not None:
            ref.actor.holding.discard(ref.shard.shard_id)
        if ref.actor.dead and not ref.ok:
            raise RayActorError()
        return {} if ref.shard is None else {"samples": 1, "errors": 0, "labels": 0}

    def kill(self, actor):
        actor.dead = True


def label(monkeypatch, tmp_path, workers, shards, fake, slots=2, retries=2):
    monkeypatch.setattr(dispatcher, "ray", SimpleNamespace(wait=fake.wait, get=fake.get, kill=fake.kill))
    config = load_config(None, {"input": ["unused.tar"], "output": str(tmp_path / "out"), "vocab": ["cat"],
                                "shards_per_worker": slots, "max_shard_retries": retries})
    summary, results = RunSummary("run", config.output, "now"), {}
    dispatcher.label_shards(SimpleNamespace(config=config, new_actor=fake.new_actor),
                            [fake.new_actor() for _ in range(workers)],
                            [Shard(f"u{i}", f"s{i}") for i in range(shards)], summary,
                            lambda shard, marker: results.__setitem__(shard.shard_id, marker is not None))
    return summary, results


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_a_shard_that_kills_its_worker_fails_alone(monkeypatch, tmp_path, workers):
    """Its worker held a healthy shard too: the healthy one is redone, uncharged, and labelled;
    only the poison shard uses up its attempts and fails."""
    summary, results = label(monkeypatch, tmp_path, workers, 10, _FakeRay(poison={"s3"}))
    assert sorted(summary.failed) == ["u3"], summary.failed
    assert summary.shards_done == 9 and all(results[f"s{i}"] for i in range(10) if i != 3)


def test_once_suspected_a_shard_runs_alone(monkeypatch, tmp_path):
    fake = _FakeRay(poison={"s0"})
    summary, _ = label(monkeypatch, tmp_path, 1, 4, fake)
    assert fake.log[:2] == [("actor1", "s0", []), ("actor1", "s1", ["s0"])]  # two shards held at once
    later = fake.log[2:]
    assert [held for _, shard, held in later if shard == "s0"] == [[], [], []]  # its 3 tries, each alone
    assert not any("s0" in held for _, _, held in later)  # nothing joins it on its actor
    assert sorted(summary.failed) == ["u0"] and summary.shards_done == 3


def test_a_shard_finishing_on_a_replaced_actor_does_not_bring_it_back(monkeypatch, tmp_path):
    """actor1 holds s0 and s1; s1 finishes, then actor1 dies on s0, and the driver hears of s0's
    death first: actor1 is replaced, and s1's success must not put it back among the free."""
    def deaths_first(refs):
        return next((r for r in refs if r.shard.shard_id == "s0"), refs[0])

    fake = _FakeRay(poison={"s0"}, order=deaths_first, done_early={"s1"})
    summary, results = label(monkeypatch, tmp_path, 1, 6, fake, retries=0)
    assert results["s1"] and sorted(summary.failed) == ["u0"] and summary.shards_done == 5


def test_a_shard_given_out_again_is_marked_as_redone(monkeypatch, tmp_path):
    """A worker redoing a shard clears up what the last one (killed while committing it) left, so
    the driver tells it: every dispatch after a shard's first says redo, whether the shard was
    charged an attempt or not (its actor died holding another one too)."""
    fake = _FakeRay(poison={"s0"})
    label(monkeypatch, tmp_path, 1, 4, fake)
    redos = {}
    for (_, shard, _), redo in zip(fake.log, fake.redos):
        redos.setdefault(shard, []).append(redo)
    assert redos["s0"] == [False, True, True, True] and redos["s1"] == [False, True]  # s1 held beside s0
    assert redos["s2"] == redos["s3"] == [False]
