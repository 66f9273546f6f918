"""The labelling run's configuration: one pydantic schema (``label_config``) for the YAML keys, the
``gemlabel label`` flags (``keys``), the validation messages and loading (``load``), and the sizes
derived from it (``sizing``).

Owns: what a run is asked to do. Imports ``pipeline.io`` (a config binds URLs to their storage
options) and ``gem.settings``; nothing else of the pipeline. Every other stage may import it. The
public names are re-exported here, so ``from pipeline.config import LabelConfig`` is the usual
spelling.
"""
from pipeline.config.errors import ConfigError
from pipeline.config.keys import ConfigKey, config_keys, default_text, markdown_table
from pipeline.config.label_config import (SCHEMA_VERSION, DecodeMode, GEMConfig, LabelConfig, PAMRConfig, SlideConfig,
                                          ThresholdConfig, class_labels, fingerprint)
from pipeline.config.load import error_message, load_config, load_storage_options

__all__ = ["SCHEMA_VERSION", "ConfigError", "ConfigKey", "DecodeMode", "GEMConfig", "LabelConfig", "PAMRConfig",
           "SlideConfig", "ThresholdConfig", "class_labels", "config_keys", "default_text", "error_message",
           "fingerprint", "load_config", "load_storage_options", "markdown_table"]
