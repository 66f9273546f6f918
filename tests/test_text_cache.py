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
    assert len(cached) == 1 and torch.load(cached[0].url, weights_only=True)["embeddings"].shape == (4, 32)
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
    from pipeline.worker.text_cache import cache_source, write_cached
    vocabulary = Vocabulary(("person", "dog"), ("a {}.",), torch.nn.functional.normalize(torch.randn(5, 8), dim=-1),
                            (("person", "man"), ("dog",)), ("sky", "wall"))
    file = Location(str(tmp_path / "text.pt"))
    source = cache_source("m", "p", None, [["person", "man"], "dog"], ["a {}."], None, ["sky", "wall"])
    write_cached(file, vocabulary, source)
    back, problem = read_cached(file, source)
    assert problem is None
    assert read_cached(file, {**source, "model": "other"})[1] == "it was encoded for another model"
    assert (back.class_names, back.templates, back.synonyms, back.background) == (
        vocabulary.class_names, vocabulary.templates, vocabulary.synonyms, vocabulary.background)
    assert torch.equal(back.embeddings, vocabulary.embeddings) and back.word_class.tolist() == [0, 0, 1, 2, 2]
    base = dict(model="m", pretrained="p", model_config=None, templates=["a {}."], dtype=None)
    assert text_cache_key(class_names=[["person", "man"], "dog"], **base) != text_cache_key(
        class_names=["person", "dog"], **base)
    assert text_cache_key(class_names=["dog"], background=["sky"], **base) != text_cache_key(
        class_names=["dog"], **base)


def _label(base_config, url, output, vocab=None):
    """One shard labelled outside Ray: (its rows without run-specific fields, the labeler)."""
    from pipeline.driver.plan import build_spec
    from pipeline.io.shards import Shard
    from pipeline.worker.labeler import ShardLabeler
    config = load_config(None, {**base_config, "input": [url], "output": output,
                                **({"vocab": vocab} if vocab else {})})
    labeler = ShardLabeler(build_spec(config), device="cpu", torch_threads=1)
    labeler.label_shard(Shard(url, "s-0"))
    return [(r["key"], r["status"], [(l["name"], l["rle_counts"]) for l in r["labels"]])
            for r in all_rows(output)], labeler


def _poisons(clean: dict, other: dict) -> dict:
    """Cache files an adversary (or a bug) could leave under the vocabulary's key."""
    import hashlib

    def consistent(fields):  # a digest recomputed to match, where the file records one
        if "sha256" in fields:
            fields["sha256"] = hashlib.sha256(fields["embeddings"].contiguous().numpy().tobytes()).hexdigest()
        return fields
    rows = clean["embeddings"]
    return {
        "permuted": {**clean, "embeddings": rows.flip(0)},
        "permuted, digest recomputed": consistent({**clean, "embeddings": rows.flip(0)}),
        "another vocabulary's": other,
        "another vocabulary's, names relabelled": consistent({**other, **{k: clean[k] for k in clean if k != "embeddings"}}),
        "NaN": {**clean, "embeddings": torch.full_like(rows, float("nan"))},
        "wrong size": {**clean, "embeddings": torch.nn.functional.normalize(torch.randn(rows.shape[0], 16), dim=-1)},
        "pickled junk": b"not a torch file",
    }


def test_a_poisoned_cache_file_is_encoded_again_and_rewritten(base_config, tmp_path, caplog):
    """Issue 18.1: permuted rows, another vocabulary's embeddings, NaN or wrong-sized ones never
    label an image; the file is rewritten and a warning names it."""
    import io
    import logging
    url = str(write_shard(tmp_path / "in/s-0.tar", varied_samples(3)))
    clean_rows, _ = _label(base_config, url, str(tmp_path / "clean"))
    assert any(labels for _, _, labels in clean_rows)
    _label(base_config, url, str(tmp_path / "other"), vocab=list(reversed(base_config["vocab"])))
    (cached,) = Location(str(tmp_path / "clean/_cache")).list_files(".pt")
    (other,) = Location(str(tmp_path / "other/_cache")).list_files(".pt")
    load = lambda file: torch.load(io.BytesIO(file.read_bytes()), weights_only=True)  # noqa: E731
    for name, poison in _poisons(load(cached), load(other)).items():
        output = tmp_path / f"out-{name.replace(' ', '_')}"
        planted = output / "_cache" / cached.name
        planted.parent.mkdir(parents=True)
        if isinstance(poison, bytes):
            planted.write_bytes(poison)
        else:
            torch.save(poison, planted)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            rows, labeler = _label(base_config, url, str(output))
        assert rows == clean_rows, name
        assert labeler.text_source == "encoded" and labeler.text_encodes == 1, name
        assert str(planted) in caplog.text and "encoding it again" in caplog.text, name
        assert torch.equal(load(Location(str(planted)))["embeddings"], load(cached)["embeddings"]), name


def test_a_sound_cache_file_is_used_without_encoding(base_config, tmp_path):
    url = str(write_shard(tmp_path / "in/s-0.tar", varied_samples(2)))
    first, _ = _label(base_config, url, str(tmp_path / "out"))
    Location(str(tmp_path / "out/labels")).remove(recursive=True)
    again, labeler = _label(base_config, url, str(tmp_path / "out"))
    assert again == first and (labeler.text_source, labeler.text_encodes) == ("cache", 0)
