import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), re.DOTALL)[:2]


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    text = (ROOT / "README.md").read_text()
    first, second = readme_commands()
    assert text.index(first) < 200, "the commands must open the README"
    assert "\n" not in first and "\n" not in second
    assert "magicseg-engine generate --preset tiny" in first and "--classes" in first
    assert second.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert second in ci
