import subprocess
import sys
from pathlib import Path

import aalconvert

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("aalconvert"))


def test_import_does_not_load_triton_or_start_cuda():
    code = (
        "import sys, torch, aalconvert, aalconvert.kernels, aalconvert.nn;"
        "assert 'triton' not in sys.modules, 'triton imported';"
        "assert not torch.cuda.is_initialized(), 'cuda started'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_console_script_reports_version():
    out = subprocess.run([CONSOLE_SCRIPT, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"aalconvert {aalconvert.__version__}"


def test_console_script_help_lists_usage():
    out = subprocess.run([CONSOLE_SCRIPT, "--help"], capture_output=True, text=True, check=True)
    assert "usage: aalconvert" in out.stdout


def test_rules_command_lists_every_rule_with_its_exactness():
    from aalconvert.rules.registry import NAMES

    out = subprocess.run(
        [CONSOLE_SCRIPT, "rules"], capture_output=True, text=True, check=True,
        env={"COLUMNS": "200", "PATH": ""},
    )
    for name in NAMES:
        assert f"│ {name} " in out.stdout, name
    assert "│ exact     │ yes           │ yes" in out.stdout
    assert "│ asa       │ no            │ no" in out.stdout
