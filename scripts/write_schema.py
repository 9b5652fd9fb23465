"""Write qbd/schema/result.schema.json from the Result's types (qbd.result_types), the one
definition it comes from; tests/unit/test_results.py fails while the shipped file differs.

    python scripts/write_schema.py
"""

from __future__ import annotations

import json
from pathlib import Path

from qbd.result_types import json_schema
from qbd.results import SCHEMA_FILE

if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "qbd" / "schema" / SCHEMA_FILE
    path.write_text(json.dumps(json_schema(), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
