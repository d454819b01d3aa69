"""The README stays true: its quick start matches CI, its config reference matches the example."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_config_reference_is_the_example_file() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- config.example.yaml -->\n```yaml\n(.*?)\n```\n<!-- /config.example.yaml -->",
        readme,
        re.DOTALL,
    )
    assert block is not None, "README lost its configuration reference block"
    assert block.group(1) == (ROOT / "config.example.yaml").read_text().rstrip("\n")


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.search(r"```sh\n(.*?)\n(.*?)\n```", readme)
    assert commands is not None
    demo, tests = commands.group(1), commands.group(2)
    assert demo.endswith("sidecar demo")
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_every_acknowledgement_is_documented() -> None:
    from sidecar.config_checks import ACKNOWLEDGEMENTS

    readme = (ROOT / "README.md").read_text()
    table = re.findall(r"^\| `([a-z_]+)` \| ", readme, re.MULTILINE)
    example = (ROOT / "config.example.yaml").read_text()
    for name in ACKNOWLEDGEMENTS:
        assert name in table, f"README's acknowledgement table lacks {name}"
        assert name in example, f"config.example.yaml's comment lacks {name}"
