"""The README stays true: its Python blocks run, and CI runs its test command."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "out" / "lora" / "adapter_model.safetensors").is_file()


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_main_command_is_peftkit_train_on_the_declared_entry_point():
    main_command = re.findall(r"```bash\n(.*?)\n```", README, re.S)[0]
    assert main_command.endswith("peftkit train")
    assert 'peftkit = "peftkit.cli:main"' in (ROOT / "pyproject.toml").read_text()
