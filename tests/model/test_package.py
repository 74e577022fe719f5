"""The `model` package loads its public names on first use, so its light submodules stay light."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def fresh(code: str) -> dict:
    """`code` in a new interpreter (this one imported torch long ago); its last line is JSON."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_command_line_and_settings_import_no_torch():
    """`rtmdet --help`, argument errors and `rtmdet serve`'s settings need none of torch; importing it before
    `serve` has set OMP_WAIT_POLICY would also force a re-exec of the whole process (service.serve_env)."""
    seen = fresh("import json, sys\n"
                 "import service.cli, service.commands, service.settings, model.config\n"
                 "from model import SIZES\n"
                 "args = service.cli.build_parser().parse_args(['serve', '--model', 'a=x.pth,size=s'])\n"
                 "assert service.commands.settings_from_args(args).models[0].size == 's'\n"
                 "print(json.dumps({'sizes': list(SIZES), 'heavy': [m for m in ('torch', 'cv2', 'torchvision')\n"
                 "                                                  if m in sys.modules]}))\n")
    assert seen == {"sizes": ["tiny", "s", "m", "l", "x"], "heavy": []}


def test_public_names_load_on_first_use_and_are_the_submodules_own():
    import model
    from model.inference.detector import Detector
    from model.nn.rtmdet import build_rtmdet

    assert model.Detector is Detector and model.build_rtmdet is build_rtmdet
    assert set(model.__all__) == set(model._WHERE) and set(model.__all__) <= set(dir(model))
    for name in model.__all__:
        assert getattr(model, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Detectr'"):
        model.Detectr  # noqa: B018
