"""Design rules that keep the code readable: gin lives at the edges only."""

import pathlib
import re

GRPO = pathlib.Path(__file__).resolve().parents[1] / "grpo"
GIN_AWARE = {"main.py", "configurables.py"}
IMPORTS_GIN = re.compile(r"^\s*(import gin\b|from gin\b)", re.MULTILINE)


def test_only_main_and_configurables_import_gin():
    offenders = [
        str(path.relative_to(GRPO))
        for path in GRPO.rglob("*.py")
        if path.name not in GIN_AWARE and IMPORTS_GIN.search(path.read_text())
    ]
    assert offenders == [], f"gin imported outside {sorted(GIN_AWARE)}: {offenders}"


def test_the_rule_sees_the_gin_aware_modules():
    # Guards the test above against a pattern that matches nothing.
    assert IMPORTS_GIN.search((GRPO / "configurables.py").read_text())
    assert IMPORTS_GIN.search((GRPO / "main.py").read_text())
