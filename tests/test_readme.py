from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2, "the README starts with exactly two commands"
    ci = [
        ln
        for ln in (ROOT / ".ci/run").read_text().splitlines()
        if ln and not ln.startswith(("#", "set ", "cd "))
    ]
    assert ci == [block[1]]
    assert "ropesp generate" in block[0]


def python_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return [part.split("```", 1)[0] for part in readme.split("```python\n")[1:]]


def test_readme_python_example_runs(capsys):
    """The README's Python section, as written (CPU, the default model)."""
    (block,) = python_blocks()
    assert len(block.strip().splitlines()) == 10
    exec(compile(block, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[:2] for ln in lines] == [["0", "(9,"], ["1", "(12,"], ["2", "(12,"]]
