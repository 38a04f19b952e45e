"""Every key under conf/ says what it does: a comment on its line or on the line directly above."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import CONF_DIR


def _has_comment(line: str) -> bool:
    """A `#` outside quotes that starts the line or follows whitespace (YAML's comment rule)."""
    quote = None
    for position, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#" and (position == 0 or line[position - 1] in " \t"):
            return True
    return False


def _key_lines(text: str) -> list[tuple[int, str]]:
    """(line index, key) of every mapping key, nested ones and those in flow mappings included."""
    keys = []
    nodes = [yaml.compose(text)]
    while nodes:
        node = nodes.pop()
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                keys.append((key.start_mark.line, key.value))
                nodes.append(value)
        elif isinstance(node, yaml.SequenceNode):
            nodes.extend(node.value)
    return sorted(keys)


def uncommented_keys(path: Path) -> list[tuple[int, str]]:
    """(line number, key) of each key with no comment on its line or on the line directly above."""
    lines = path.read_text().splitlines()
    return [
        (index + 1, key)
        for index, key in _key_lines(path.read_text())
        if not _has_comment(lines[index]) and not (index > 0 and lines[index - 1].lstrip().startswith("#"))
    ]


def test_every_conf_key_has_a_comment() -> None:
    files = sorted(CONF_DIR.rglob("*.yaml"))
    assert len(files) > 40 and any(path.parts[-3] == "hydra" for path in files)  # Hydra's own groups too
    missing = [
        f"{path.relative_to(CONF_DIR.parent)}:{line}: {key}" for path in files for line, key in uncommented_keys(path)
    ]
    assert missing == [], "keys without a comment on their line or the line above:\n" + "\n".join(missing)


def test_the_check_sees_a_missing_comment_and_ignores_a_hash_inside_quotes(tmp_path: Path) -> None:
    conf = tmp_path / "conf.yaml"
    conf.write_text('# what a is\na: 1\nb: "#2"\nc: [x]  # what c is\nd:\n  # what e is\n  e: {f: 1}  # f\n  g: 2\n')
    assert uncommented_keys(conf) == [(3, "b"), (5, "d"), (8, "g")]
