"""Writing a benchmark's results: JSON for machines, the markdown table for people."""
from __future__ import annotations

import json


def write_results(payload: dict, table: str, out_json: str | None, out_md: str | None) -> None:
    if out_json:
        with open(out_json, "w") as f:
            json.dump(payload, f, indent=1)
    if out_md:
        with open(out_md, "w") as f:
            f.write(table)
