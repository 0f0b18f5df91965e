"""The README's usage example runs as written, its test command is the one CI runs, and it stands alone
(every link resolves inside the repository)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_usage_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert (tmp_path / "my_adapter" / "adapter_model.safetensors").is_file()
    assert scope["model"].tiedlora.config.preset == "tl6"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"## Tests\n\n```bash\n(.*?)\n```", readme, re.S).group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text()


def test_readme_and_docs_links_resolve_inside_the_repository():
    for doc in (ROOT / "README.md", ROOT / "docs" / "MATH.md"):
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)]+)\)", text):
            if target.startswith(("http://", "https://", "#")):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), (doc.name, target)
        # Notes that only exist outside the repository must not be cited.
        assert "SPEC.md" not in text and "seed 003" not in text, doc.name
