"""Each verb group's module imports on its own, before `mechscope.cli` (which imports them all): their
shared options live in `mechscope.cli_common`, so no import cycle runs through `mechscope.cli`."""

import subprocess
import sys

import pytest

GROUPS = ["mechscope.lens.cli", "mechscope.patching.cli", "mechscope.patching.cli_path", "mechscope.toys.cli",
          "mechscope.probes.cli", "mechscope.steering.cli", "mechscope.dictionaries.cli",
          "mechscope.dictionaries.cli_dashboard", "mechscope.dictionaries.cli_attribute"]


@pytest.mark.parametrize("module", GROUPS)
def test_a_verb_group_imports_before_the_cli(module):
    code = f"import {module}, mechscope.cli; assert mechscope.cli.app.registered_groups"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
