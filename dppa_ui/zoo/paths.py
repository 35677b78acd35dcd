"""Where the demo family lives, and the files that describe it."""
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parents[2] / "assets" / "zoo"
INFO_FILE = "dppa_zoo.json"      # each model's role, domain and recipe
MANIFEST = "zoo.json"            # the family's names, domains and seed
