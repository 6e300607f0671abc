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


def report(payload: dict, lines: list[str], description: str, out_json: str | None, out_md: str | None) -> None:
    """A GPU script's results: its table (`lines`) under a head naming the GPU, torch and triton
    and what was timed (`description`), printed, and written as JSON and markdown."""
    import torch
    import triton
    md = (f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"{description}\n\n" + "\n".join(lines) + "\n")
    print(md)
    write_results(payload, md, out_json, out_md)
