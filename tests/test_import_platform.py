"""The ``platform/`` source folder must never shadow the standard library's ``platform`` module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).absolute().parents[1]
_PROBE = "import platform, knet_platform; print(platform.system(), platform.__file__)"


def test_platform_folder_has_no_init_file() -> None:
    assert (ROOT / "platform").is_dir()
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_import_platform_from_the_repository_root_gives_the_standard_library() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    )
    system, location = result.stdout.split()
    assert system and not Path(location).is_relative_to(ROOT / "platform")


def test_import_platform_with_the_root_first_on_sys_path_gives_the_standard_library() -> None:
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); {_PROBE}"
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    system, location = result.stdout.split()
    assert system and not Path(location).is_relative_to(ROOT / "platform")
