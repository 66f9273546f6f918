"""The vocabulary is encoded once per run, shipped to the other workers, and cached for reruns."""
import shutil

import torch

from pipeline.config import load_config
from pipeline.store.layout import OutputLayout, read_markers
from pipeline.driver.run import run_labeling
from pipeline.io.storage import Location
from pipeline.worker.text_cache import read_cached, text_cache_key
from tests.outputs import all_rows, check_labels
from tests.shards import varied_samples, write_shard


def test_two_workers_encode_once_and_a_rerun_reads_the_cache(ray_session, base_config, tmp_path):
    first = [str(write_shard(tmp_path / f"in/a-{s}.tar", varied_samples(4, prefix=f"s{s}-"))) for s in range(3)]
    config = {**base_config, "num_workers": 2, "cpus_per_worker": 0.5}
    summary = run_labeling(load_config(None, {**config, "input": first}))
    assert (summary.shards_done, summary.text_encodes) == (3, 1)
    cached = Location(f"{config['output']}/_cache").list_files(".pt")
    assert len(cached) == 1 and read_cached(cached[0]).embeddings.shape == (4, 32)
    sources = {m["worker"]["text_source"] for m in read_markers(OutputLayout(Location(config["output"]))).values()}
    assert sources <= {"encoded", "shipped"}

    second = [str(write_shard(tmp_path / f"in/b-{s}.tar", varied_samples(4, prefix=f"s{s}-"))) for s in range(2)]
    summary = run_labeling(load_config(None, {**config, "input": first + second}))
    assert (summary.shards_done, summary.shards_skipped, summary.text_encodes) == (2, 3, 0)
    new = [m for m in read_markers(OutputLayout(Location(config["output"]))).values() if "/b-" in m["shard"]]
    assert {m["worker"]["text_source"] for m in new} <= {"cache", "shipped"} and len(new) == 2
    rows = all_rows(config["output"])
    assert len(rows) == 20 and all(row["status"] == "ok" for row in rows)
    for row in rows:
        check_labels(row)


def test_cache_key_follows_model_weights_vocabulary_and_templates(micro_checkpoint, tmp_path):
    args = dict(model="gemtest-micro", pretrained=micro_checkpoint, model_config=None,
                class_names=["cat", "dog"], templates=["a photo of a {}."], dtype=None)
    key = text_cache_key(**args)
    copy = shutil.copy(micro_checkpoint, tmp_path / "renamed.pt")
    assert text_cache_key(**{**args, "pretrained": str(copy)}) == key  # by content, not by path
    changed = tmp_path / "changed.pt"
    state = torch.load(micro_checkpoint)
    next(iter(state.values())).add_(1.0)
    torch.save(state, changed)
    variants = [{"class_names": ["cat", "dog", "car"]}, {"class_names": ["dog", "cat"]},
                {"templates": ["a {}."]}, {"pretrained": str(changed)}, {"model": "gemref-tiny"},
                {"dtype": torch.bfloat16}]
    keys = {text_cache_key(**{**args, **variant}) for variant in variants}
    assert key not in keys and len(keys) == len(variants)


def test_cached_vocabulary_keeps_synonyms_and_background(tmp_path):
    """A synonym vocabulary comes back from the cache with every word's row and its class."""
    from gem.vocabulary import Vocabulary
    from pipeline.worker.text_cache import write_cached
    vocabulary = Vocabulary(("person", "dog"), ("a {}.",), torch.randn(5, 8), (("person", "man"), ("dog",)),
                            ("sky", "wall"))
    file = Location(str(tmp_path / "text.pt"))
    write_cached(file, vocabulary)
    back = read_cached(file)
    assert (back.class_names, back.templates, back.synonyms, back.background) == (
        vocabulary.class_names, vocabulary.templates, vocabulary.synonyms, vocabulary.background)
    assert torch.equal(back.embeddings, vocabulary.embeddings) and back.word_class.tolist() == [0, 0, 1, 2, 2]
    base = dict(model="m", pretrained="p", model_config=None, templates=["a {}."], dtype=None)
    assert text_cache_key(class_names=[["person", "man"], "dog"], **base) != text_cache_key(
        class_names=["person", "dog"], **base)
    assert text_cache_key(class_names=["dog"], background=["sky"], **base) != text_cache_key(
        class_names=["dog"], **base)
