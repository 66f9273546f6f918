"""Worker sizing defaults come from the node's CPUs per GPU; keys set in the config are kept."""
from pipeline.config import load_config
from pipeline.store.layout import OutputLayout, read_markers
from pipeline.driver.run import run_labeling
from pipeline.config.sizing import derive_sizing
from pipeline.io.storage import Location
from tests.shards import varied_samples, write_shard


def test_gpu_workers_take_their_share_of_the_node():
    h100_node = derive_sizing(node_cpus=16, node_gpus=1, use_gpu=True)
    assert (h100_node.cpus_per_worker, h100_node.decode_threads, h100_node.postprocess_threads,
            h100_node.batch_size) == (16, 12, 3, 64)
    eight_gpus = derive_sizing(node_cpus=96, node_gpus=8, use_gpu=True)
    assert (eight_gpus.cpus_per_worker, eight_gpus.decode_threads, eight_gpus.postprocess_threads) == (12, 9, 2)
    half_gpu = derive_sizing(node_cpus=16, node_gpus=2, use_gpu=True, gpus_per_worker=0.5)
    assert (half_gpu.cpus_per_worker, half_gpu.batch_size) == (4, 64)
    assert derive_sizing(node_cpus=8, node_gpus=0, use_gpu=True).cpus_per_worker == 8  # no GPU node yet


def test_cpu_workers_split_the_node_and_given_keys_are_kept():
    laptop = derive_sizing(node_cpus=2, node_gpus=0, use_gpu=False)
    assert (laptop.cpus_per_worker, laptop.decode_threads, laptop.postprocess_threads, laptop.batch_size) == (2, 2, 1, 16)
    assert derive_sizing(node_cpus=32, node_gpus=0, use_gpu=False, workers=4).cpus_per_worker == 8
    given = derive_sizing(16, 1, True, cpus_per_worker=6, decode_threads=3, postprocess_threads=5, batch_size=7)
    assert (given.cpus_per_worker, given.decode_threads, given.postprocess_threads, given.batch_size) == (6, 3, 5, 7)


def test_a_run_without_sizing_keys_uses_the_derived_ones(ray_session, base_config, tmp_path):
    config = {k: v for k, v in base_config.items() if k not in ("batch_size", "cpus_per_worker", "decode_threads")}
    url = str(write_shard(tmp_path / "in/s-0.tar", varied_samples(5)))
    summary = run_labeling(load_config(None, {**config, "input": [url]}))
    assert summary.shards_done == 1
    worker = next(iter(read_markers(OutputLayout(Location(config["output"]))).values()))["worker"]
    # ray_session: 2 CPUs, no GPU, one worker
    assert (worker["torch_threads"], worker["decode_threads"], worker["postprocess_threads"],
            worker["batch_size"]) == (2, 2, 1, 16)
