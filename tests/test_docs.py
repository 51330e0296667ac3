"""The README stays true: its set-up commands and every `lakepipe …` example parse
against the real CLI (unknown commands or options fail here, not for a new user)."""

from __future__ import annotations

import re
import shlex

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def _examples() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    out = []
    for block in blocks:
        # join continuation lines of multi-line SQL strings
        for cmd in re.split(r"\n(?=\S)", block.strip()):
            cmd = re.sub(r"\s+#.*$", "", cmd.replace("\n", " "), flags=re.M).strip()
            for part in cmd.split("&&"):
                words = shlex.split(part.strip())
                if words and words[0] == "lakepipe":
                    out.append(words[1:])
    return out


def test_readme_has_the_two_setup_commands():
    assert "python3 -m pip install -e . && lakepipe run demo" in README
    assert "python3 -m pip install -e '.[test]' && python3 -m pytest" in README


def _command_path(words: list[str]) -> list[str]:
    """The leading words that name a (sub)command of the real CLI."""
    from typer.main import get_command

    from lakepipe.cli import app

    group, path = get_command(app), []
    for w in words:
        commands = getattr(group, "commands", {})
        if w not in commands:
            break
        path.append(w)
        group = commands[w]
    return path


def test_readme_examples_are_valid_commands(cli):
    examples = _examples()
    assert len(examples) >= 6
    for words in examples:
        path = _command_path(words)
        assert path, words
        r = cli(*path, "--help")
        assert r.exit_code == 0, (words, r.stdout, r.stderr)
        for opt in [w.split("=")[0] for w in words if w.startswith("-")]:
            assert opt in r.stdout, (words, opt)


def _next_steps() -> list[list[str]]:
    """The commands of the README's "Next steps after `lakepipe run demo`" block."""
    section = README.split("## Next steps after", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    out = []
    for cmd in re.split(r"\n(?=\S)", block.strip()):
        words = shlex.split(cmd.replace("\n", " "), comments=True)
        assert words[0] == "lakepipe", cmd
        out.append(words[1:])
    return out


def test_readme_next_steps_run_on_the_real_demo(cli, tmp_path, monkeypatch):
    # what a new user types after `lakepipe run demo`, in order, on the real demo lake:
    # every command succeeds, prints something, and the files it names are written
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LAKEPIPE_LAKE", raising=False)
    r = cli("run", "demo", "--no-progress")
    assert r.exit_code == 0, r.stderr
    steps = _next_steps()
    assert len(steps) >= 10
    for words in steps:
        r = cli(*words)
        assert r.exit_code == 0, (words, r.stdout, r.stderr)
        assert r.stdout.strip() or r.stderr.strip(), words
        if "-o" in words:
            out = tmp_path / words[words.index("-o") + 1]
            assert out.exists() and out.stat().st_size > 0, words
    # the demo's showcase objects are really there
    gcn = (tmp_path / "gcn.txt").read_text()
    assert "+/-" in gcn and "> " in gcn  # detections after T0, limits before it
    r = cli("query", "-p", "demo", "-f", "csv", "select count(*) as n from vanished")
    assert int(r.stdout.splitlines()[1]) >= 1
