"""The generated code in src/broker/v1 is what `make proto` makes from proto/ now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_the_contract(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec
    assert spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert fresh, "protoc generated nothing"
    for relative in fresh:
        checked_in = ROOT / "src" / relative
        assert checked_in.exists(), f"{relative} is not checked in: run `make proto`"
        assert checked_in.read_text() == (tmp_path / relative).read_text(), (
            f"{relative} is stale: run `make proto`"
        )
