"""The options engine (dataclass -> argparse / YAML / did-you-mean): moved here from config.py."""
