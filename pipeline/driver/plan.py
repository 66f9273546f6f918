"""What a run will do, checked in the driver before any worker starts: the vocabulary, the model
and the settings that depend on it, storage options and the output folder, the run's fingerprint
(``build_spec``) and the shards still to label (``select_shards``)."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union


from gem.loading import WeightsUnavailableError, check_checkpoint_file, check_weights_available, vision_config
from gem.templates import clean_class_names, resolve_templates
from pipeline.config import ConfigError, LabelConfig, fingerprint
from pipeline.driver.resolve import content_fingerprints
from pipeline.io.shards import Shard
from pipeline.io.storage import Location, same_file_version
from pipeline.worker.labeler import RunSpec, register_model_config, spec_source
from pipeline.config.errors import first_line


def read_vocab_file(source: Location) -> list[str]:
    """Class names from a UTF-8 file, one a line; '#' starts a comment (whole-line or inline)."""
    url = source.url
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"vocab_file: no such file {url}") from None
    except Exception as err:  # fsspec back ends raise their own kinds (aiohttp, botocore, ...)
        raise ConfigError(f"vocab_file: cannot read {url}: {first_line(err)}") from None
    if b"\x00" in data:
        raise ConfigError(f"vocab_file: {url} looks binary; give a text file with one class name a line")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"vocab_file: {url} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def resolve_vocabulary(config: LabelConfig) -> list[Union[str, list[str]]]:
    """The classes, each a name or a list of synonyms (the first name is the label). YAML: one
    class per list item, a string item never split, a list item holding synonyms (the --vocab
    flag's commas and bars were split by the CLI); vocab files: one class a line, commas between
    synonyms. Names repeated across classes, synonyms and background names are an error."""
    if config.vocab_file:
        lines = read_vocab_file(config.location(config.vocab_file))
        entries = [line.split(",") for line in lines]
    else:
        entries = [[item] if isinstance(item, str) else item for item in config.vocab]
    entries = [[name.strip() for name in entry] for entry in entries]
    try:
        clean_class_names([name for entry in entries for name in entry] + list(config.background))
    except ValueError as err:
        raise ConfigError(f"vocab: {err}") from None
    return [entry[0] if len(entry) == 1 else entry for entry in entries]


def check_model(config: LabelConfig) -> None:
    """Model name, weights, and the settings that depend on the model's architecture (GEM depth,
    input size vs patch size), checked in the driver from the model config before any worker starts."""
    register_model_config(config.model_config)
    try:
        check_weights_available(config.model, config.pretrained)
        check_checkpoint_file(config.pretrained)
    except (ValueError, WeightsUnavailableError) as err:  # UnsupportedModelError is a ValueError
        raise ConfigError(f"model: {err}", key="pretrained" if isinstance(err, WeightsUnavailableError) else "") \
            from None
    check_vfm_and_sam(config)
    vision = vision_config(config.model)
    if not vision:
        return
    layers, patch = vision.get("layers"), vision.get("patch_size")
    if isinstance(layers, int) and config.gem.depth > layers:
        raise ConfigError(f"gem.depth: {config.model} has {layers} blocks, so depth must be at most {layers}; "
                          f"got {config.gem.depth}")
    if isinstance(patch, int) and config.resize == "short_side" and config.short_side < patch:
        raise ConfigError(f"short_side: {config.model} uses {patch}-pixel patches, so short_side must be at least "
                          f"{patch}; got {config.short_side}")
    if isinstance(patch, int) and config.slide.crop is not None and config.slide.crop < patch:
        raise ConfigError(f"slide.crop: {config.model} uses {patch}-pixel patches, so the crop must be at least "
                          f"{patch}; got {config.slide.crop}")
    if isinstance(patch, int):
        height, width = config.input_size
        if min(height, width) < patch or height % patch or width % patch:
            raise ConfigError(f"input_size: {config.model} uses {patch}-pixel patches, so each side must be a "
                              f"multiple of {patch} (at least {patch}); got {config.input_size}")


def check_vfm_and_sam(config: LabelConfig) -> None:
    """ProxyCLIP's VFM and SAM refinement's weights, where the config uses them: found (a file,
    or the hub's cached or reachable copy) before any worker starts, else one line naming the key."""
    try:
        if config.method == "proxyclip":
            from gem.vfm import check_vfm_weights
            check_vfm_weights(config.proxyclip.vfm)
    except (ValueError, WeightsUnavailableError) as err:
        raise ConfigError(f"proxyclip.vfm.weights: {first_line(err)}") from None
    try:
        if config.refine == "sam":
            from gem.sam import check_sam_weights
            check_sam_weights(config.sam.model, config.sam.weights)
    except (ValueError, WeightsUnavailableError) as err:
        raise ConfigError(f"sam.weights: {first_line(err)}") from None


def build_spec(config: LabelConfig, claimed: Optional[dict] = None) -> RunSpec:
    """The run's spec. ``claimed``: the output's ``_config.json``, if any; an output begun before
    labels had ``instances`` (its fingerprint is this config's without them) is continued without
    them, so its Parquet files keep one schema (readers of the root as one table need that)."""
    class_names = resolve_vocabulary(config)
    try:
        templates = list(resolve_templates(config.templates))
    except ValueError as err:
        message = str(err)
        raise ConfigError(message if message.startswith("templates:") else f"templates: {message}") from None
    contents = content_fingerprints(config)
    legacy = fingerprint(spec_source(config, class_names, templates, contents, instances=False))
    if claimed is not None and claimed.get("fingerprint") == legacy and not config.overwrite:
        return RunSpec(config, class_names, templates, legacy, contents, instances=False)
    source = spec_source(config, class_names, templates, contents, instances=True)
    return RunSpec(config, class_names, templates, fingerprint(source), contents)


def select_shards(shards: list[Shard], markers: dict[str, dict], spec: RunSpec,
                  inputs: Optional[dict[str, Optional[dict]]] = None) -> list[Shard]:
    """Shards still to label: not done (no readable labels, done under another fingerprint, or
    the input shard changed since: ``inputs`` maps its URL to its current identity), or with
    failed samples when retry_failed is set. ``markers`` holds only shards whose labels are
    readable (see ``verify_markers``)."""
    todo = []
    for shard in shards:
        marker = markers.get(shard.shard_id)
        done = (marker is not None and marker.get("fingerprint") == spec.fingerprint
                and same_file_version(marker.get("input"), (inputs or {}).get(shard.url)))
        if spec.config.overwrite or not done or (spec.config.retry_failed and marker.get("errors", 0) > 0):
            todo.append(shard)
    return todo


HTTP_REQUEST_OPTIONS = {"headers", "auth", "cookies", "proxy", "proxy_auth", "ssl", "allow_redirects"}


def filesystem_parameters(protocol: str) -> set[str]:
    """The option names a protocol's fsspec filesystem takes (its and its bases' named
    parameters), plus the top-level endpoint_url/region_name that pipeline.io.storage moves for s3."""
    import inspect

    import fsspec
    names = {"endpoint_url", "region_name"} if protocol in ("s3", "s3a") else set()
    for klass in fsspec.get_filesystem_class(protocol).__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= {name for name, param in inspect.signature(init).parameters.items()
                      if name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)}
    if protocol in ("http", "https"):  # passed on to every aiohttp request (HTTPFileSystem's **kwargs)
        names |= HTTP_REQUEST_OPTIONS
    return names | {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths"}


def check_storage_options(config: LabelConfig) -> None:
    """Each protocol's options must be ones its fsspec filesystem takes (fsspec would silently
    ignore a misspelt key such as endpont_url)."""
    for protocol, options in config.storage_options.items():
        try:
            known = filesystem_parameters(protocol)
        except (ValueError, ImportError) as err:
            raise ConfigError(f"storage_options.{protocol}: {first_line(err)}") from None
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"storage_options.{protocol}: unknown key {unknown[0]} for the {protocol} "
                              f"filesystem (known: {', '.join(sorted(known))})")


def check_output_location(output: str) -> None:
    """A local output must be (or be creatable as) a folder: not a file, nor under one."""
    if "://" in output and not output.startswith("file://"):
        return
    path = os.path.abspath(output[len("file://"):] if output.startswith("file://") else output)
    if os.path.isfile(path):
        raise ConfigError(f"output: {output} is a file; give a folder (it is created if missing)")
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    if parent and not os.path.isdir(parent):
        raise ConfigError(f"output: {output} is under {parent}, which is a file, not a folder")


def with_read_timeout(config: LabelConfig) -> LabelConfig:
    """HTTP(S) streams get a read timeout (aiohttp's default waits 5 minutes in all), so a stalled
    server fails the shard in read_timeout_s; a timeout the user set in client_kwargs wins."""
    import aiohttp
    options = {protocol: dict(values) for protocol, values in config.storage_options.items()}
    for protocol in ("http", "https"):
        client = dict(options.get(protocol, {}).get("client_kwargs", {}))
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=30,
                                                           sock_read=config.read_timeout_s))
        options.setdefault(protocol, {})["client_kwargs"] = client
    return dataclasses.replace(config, storage_options=options)
