"""``python -m pipeline.config`` prints the configuration table of docs/configuration.md."""
from pipeline.config.keys import markdown_table

print(markdown_table())
