#!/usr/bin/env python3
"""check_guided.py - validate guided-decoding outputs with Python's own tools.

Called by tests/guided.rs with the venv interpreter of
tests/support/python-env.sh (which installs `jsonschema`). Reads a JSON list
on stdin; each entry is one output and what it had to match:

    {"kind": "json_schema", "schema": {...}, "text": "..."}
    {"kind": "regex", "pattern": "...", "text": "..."}     (re.fullmatch)
    {"kind": "choice", "choices": ["...", ...], "text": "..."}

Prints one JSON line: {"checked": N, "failed": [{"index": i, "why": "..."}]}
and exits 0 when nothing failed, 1 otherwise.
"""
import json
import re
import sys

import jsonschema


def check(entry):
    kind, text = entry["kind"], entry["text"]
    if kind == "json_schema":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            return f"does not parse as JSON: {e}"
        try:
            jsonschema.validate(value, entry["schema"])
        except jsonschema.ValidationError as e:
            return f"does not validate: {e.message}"
        return None
    if kind == "regex":
        return None if re.fullmatch(entry["pattern"], text) else "does not match"
    if kind == "choice":
        return None if text in entry["choices"] else "is not one of the choices"
    return f"unknown kind {kind!r}"


def main():
    entries = json.load(sys.stdin)
    failed = []
    for i, entry in enumerate(entries):
        why = check(entry)
        if why is not None:
            failed.append({"index": i, "why": why, "text": entry["text"][:200]})
    print(json.dumps({"checked": len(entries), "failed": failed}))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
