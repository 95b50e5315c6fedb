"""soxs-reduce: organise and reduce a directory of raw frames (filled in by the execute stage)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("soxs-reduce: not yet available")
